// The pre-load validator: a GGUF file is untrusted input, and llama.cpp rejects some malformed
// values with GGML_ASSERT (an abort of the whole process) instead of an error. validate_gguf reads
// the file's metadata once, before llama.cpp sees it, and raises model_format_error(field, offset,
// reason) -> lamina.ModelFormatError for anything below.
//
// It walks the file itself rather than through ggml's gguf_init_from_file: that reader gives no
// byte offsets, and on Gemma 3's 262k-token vocabulary it copies every token into a std::string
// (about 30 ms, most of the validator's budget of 5% of a load). The structural rules are ggml's
// own (gguf.cpp in the pin), so a file this walk accepts is one ggml's reader accepts too.
//
// What is checked, and why. The structural classes are those of llama.cpp's tests/test-gguf.cpp
// (HANDCRAFTED_HEADER_BAD_*, _KV_BAD_*, _TENSORS_BAD_*, _DATA_NOT_ENOUGH_DATA) and of the public
// GGUF advisories: Cisco Talos' TALOS-2024-1912..1916 (CVE-2024-21802, -21825, -23496, -23605,
// -25664..-25666: unchecked counts, lengths and sizes in gguf_init_from_file overflowing the heap),
// and CVE-2026-7482 (Ollama: tensor shapes that claim more data than the file holds, read out of
// bounds). The others are the values fuzzing (ci/fuzz.py) found to abort llama.cpp:
//
//   structure (ggml refuses these with an error; checked here for the offset and one message)
//   magic "GGUF"; version 2..3, not byte-swapped           HEADER_BAD_MAGIC, HEADER_BAD_VERSION_*
//   n_tensors, n_kv >= 0 and no more than the bytes left   HEADER_BAD_N_TENSORS, _BAD_N_KV
//     can hold (a count of 2^63 must not size a vector)
//   each key: non-empty, unique, length inside the file    KV_BAD_KEY_SIZE, duplicate keys
//   each value type 0..12; arrays of arrays refused;       KV_BAD_TYPE
//     array counts no more than the bytes left hold
//   every string length inside the file                    KV_BAD_VALUE_SIZE
//   general.alignment: a u32, a power of two               KV_BAD_ALIGN
//   keys looked up as llama.cpp does: up to a NUL          gguf_find_key uses strcmp (first wins)
//   strings < 1 GiB, arrays < 2^30 items                   GGUF_MAX_STRING_LENGTH / _ARRAY_ELEMENTS
//   the other files of a split model: their structure     (mmap'd data alignment, as above)
//   tensor names: < 64 bytes, unique                       TENSORS_BAD_NAME_SIZE, _DUPLICATE_NAME
//   n_dims <= 4, dims >= 0, element count and byte size    TENSORS_BAD_N_DIMS, _BAD_SHAPE,
//     representable (no int64 / size_t overflow)           _NE_TOO_BIG
//   tensor type a live ggml type, row divisible by block   TENSORS_BAD_TYPE, _BAD_BLOCK_SIZE
//   offsets contiguous and aligned, the data in the file   TENSORS_BAD_OFFSET, DATA_NOT_ENOUGH_DATA
//   each tensor's data 32-byte aligned in the file         ggml-backend: GGML_ASSERT(ptr % TENSOR_
//     (general.alignment 8 passes ggml's reader)             ALIGNMENT == 0) on mmap'd data (fuzzer)
//
//   hyperparameters (llama_model::load_hparams asserts these: an abort, not an error)
//   <arch>.block_count in [1, 512]                         GGML_ASSERT(n_layer_all <= LLAMA_MAX_LAYERS)
//   <arch>.nextn_predict_layers <= block_count             GGML_ASSERT(n_layer_nextn <= n_layer_all)
//   expert_count <= 1024, expert_used_count <= it, > 0     GGML_ASSERT(n_expert <= LLAMA_MAX_EXPERTS),
//     with experts; expert groups divide the experts         n_expert_used_max <= n_expert, groups
//     (HunYuan dense: one expert counts as none)
//   rope.scaling.type one of none/linear/yarn/longrope     GGML_ASSERT(!= ..._UNSPECIFIED)
//   context_length, embedding_length >= 1                  a zero-sized context or embedding
//   per layer (scalar, int or bool array): a layer with    ggml_mul_mat: GGML_ASSERT(a->ne[0] ==
//     attention has 1 <= head_count_kv <= head_count,        b->ne[0]) and its broadcast (fuzzer)
//     dividing it; llama/gemma* layers all have heads        gemma3 27B: n_embd / n_head(0)
//   key_length, value_length (and _swa) >= 1 with heads    zero-sized attention tensors
//   rope.dimension_count (and _swa) even, <= head size     ggml_rope: GGML_ASSERT(n_dims <= ne0)
//   a sliding window's layer pattern leaves a sliding      llama_model: GGML_ASSERT(is_swa_any())
//     layer (not period 1, not all false / empty)            at context creation (fuzzer)
//   every <arch>.*epsilon finite and > 0                   ggml-cpu norm ops: GGML_ASSERT(eps >= 0)
//
//   vocabulary (llama_vocab::load; skipped for tokenizer.ggml.model "none")
//   tokenizer.ggml.tokens an array of < 2^31 strings       llama_token is int32
//   scores (f32/i32) and token_type (i32) arrays cover     out-of-bounds reads of scores[i]
//     every token                                            and toktypes[i] (llama.cpp checks too)
//   no two tokens with the same text, read as llama.cpp    GGML_ASSERT(id_to_token.size() ==
//     reads it: up to a NUL (a C string), an empty one as    token_to_id.size()) (fuzzer: NUL)
//     "[EMPTY_<i>]" (llama.cpp's rename)
//   byte tokens (type 6) of SentencePiece, Unigram and     token_to_byte's substr(3, 2) and
//     BPE vocabularies are exactly "<0xNN>" (upper-case      byte_to_token's "<0x%02X>" lookup
//     hex), one per byte; WordPiece (bert) has none          token_to_byte: GGML_ABORT for WPM
//   RWKV: a byte that starts a token is a token itself     the RWKV tokenizer loops forever
//
// At run time (model.cpp): text needs a vocabulary (tokenize, detokenize and token_to_piece abort
// on a "none" one), and add_special needs the BOS / EOS / SEP tokens the vocabulary asks for
// (GGML_ASSERT(special_bos_id != LLAMA_TOKEN_NULL) in tokenize).
//
// A file that passes is still only as safe as llama.cpp's own checks of everything else (tensor
// shapes against the architecture are llama.cpp's, and raise LoadError); ci/fuzz.py is the test.
#include "lamina.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#if !defined(_WIN32)
#include <cerrno>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace lamina {
namespace {

constexpr int64_t k_max_layers = 512;    // LLAMA_MAX_LAYERS (src/llama-hparams.h)
constexpr int64_t k_max_experts = 1024;  // LLAMA_MAX_EXPERTS
constexpr uint32_t k_max_name = 64;      // GGML_MAX_NAME
constexpr uint64_t k_max_string = uint64_t(1) << 30;  // GGUF_MAX_STRING_LENGTH (gguf.cpp)
constexpr uint64_t k_max_array = uint64_t(1) << 30;   // GGUF_MAX_ARRAY_ELEMENTS
constexpr uint64_t k_tensor_alignment = 32;           // TENSOR_ALIGNMENT (ggml-backend-impl.h)

// GGUF value types (gguf.h's enum gguf_type) and their sizes; 0: string / array
enum : uint32_t { U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64, N_TYPES };
constexpr uint32_t k_type_size[N_TYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
constexpr const char * k_type_name[N_TYPES] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string",
                                               "array", "u64", "i64", "f64"};

bool is_int(uint32_t t) { return t <= I32 || t == U64 || t == I64; }

// The file, mapped read-only (POSIX) or its metadata read on demand in growing chunks (Windows):
// only the pages the walk touches are read, never the tensor data.
class meta_file {
public:
    explicit meta_file(const std::string & path) {
#if defined(_WIN32)
        std::error_code ec;
        size_ = std::filesystem::file_size(path, ec);
        if (ec) throw load_error("cannot stat '" + path + "': " + ec.message());
        f_ = std::fopen(path.c_str(), "rb");
        if (f_ == nullptr) throw load_error("cannot open '" + path + "'");
#else
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw load_error("cannot open '" + path + "': " + std::strerror(errno));
        struct stat sb {};
        if (::fstat(fd, &sb) != 0) {  // the size of what is mapped, not of whatever the path names now
            const int err = errno;
            ::close(fd);
            throw load_error("cannot stat '" + path + "': " + std::strerror(err));
        }
        size_ = uint64_t(sb.st_size);
        if (size_ > uint64_t(SIZE_MAX)) {
            ::close(fd);
            throw load_error("'" + path + "' is larger than this process can map");
        }
        if (size_ > 0) {
            void * p = ::mmap(nullptr, size_t(size_), PROT_READ, MAP_PRIVATE, fd, 0);
            if (p == MAP_FAILED) {
                const int err = errno;
                ::close(fd);
                throw load_error("cannot map '" + path + "': " + std::strerror(err));
            }
            map_ = static_cast<const char *>(p);
        }
        ::close(fd);
#endif
    }
    ~meta_file() {
#if defined(_WIN32)
        std::fclose(f_);
#else
        if (map_) ::munmap(const_cast<char *>(map_), size_t(size_));
#endif
    }
    meta_file(const meta_file &) = delete;
    meta_file & operator=(const meta_file &) = delete;

    uint64_t size() const { return size_; }
    // make [off, off + n) readable; false when the file is shorter
    bool need(uint64_t off, uint64_t n) {
        if (n > size_ || off > size_ - n) return false;
#if defined(_WIN32)
        const uint64_t end = off + n;
        if (end <= buf_.size()) return true;
        const uint64_t want = std::min<uint64_t>(size_, std::max<uint64_t>({end, uint64_t(2 * buf_.size()), uint64_t(1) << 20}));
        const size_t have = buf_.size();
        buf_.resize(size_t(want));
        return _fseeki64(f_, int64_t(have), SEEK_SET) == 0 && std::fread(buf_.data() + have, 1, size_t(want - have), f_) == want - have;
#else
        return true;
#endif
    }
#if defined(_WIN32)
    const char * at(uint64_t off) const { return buf_.data() + off; }
#else
    const char * at(uint64_t off) const { return map_ + off; }
#endif

private:
    uint64_t size_ = 0;
#if defined(_WIN32)
    std::FILE * f_ = nullptr;
    std::string buf_;
#else
    const char * map_ = nullptr;
#endif
};

struct kv_info {
    uint32_t type = 0, arr_type = 0;  // arr_type: the item type when type == ARR
    uint64_t n = 1;                   // items (1 for a scalar)
    uint64_t off = 0;                 // the value (for arrays: the first item)
};

class validator {
public:
    explicit validator(const std::string & path) : path_(path), f_(path) {}

    void run() {
        structure();
        hparams();
        vocab();
    }
    // the GGUF structure only: the other files of a split model (the first one holds the rest)
    void structure() {
        header();
        kv_pairs();
        tensors();
    }
    // the other files of a split model ("name-00001-of-00003.gguf"), as llama.cpp names them
    std::vector<std::string> other_splits() const {
        const auto n = int_key("split.count");
        if (!n || *n <= 1 || *n > 65535 || int_key("split.no").value_or(-1) != 0) return {};
        std::vector<char> buf(path_.size() + 64, 0);
        const int len = llama_split_prefix(buf.data(), buf.size(), path_.c_str(), 0, int(*n));
        if (len <= 0) return {};  // not a split file name: llama.cpp refuses it
        const std::string prefix(buf.data(), size_t(len));
        std::vector<std::string> out;
        for (int i = 1; i < int(*n); ++i) {
            const int m = llama_split_path(buf.data(), buf.size(), prefix.c_str(), i, int(*n));
            if (m > 0) out.emplace_back(buf.data(), size_t(m));
        }
        return out;
    }

    // the tensors structure() read: shape (ggml's ne), ggml type, where the tensor's info starts
    struct tensor_meta {
        int64_t ne[4];
        uint32_t type;
        uint64_t at;
        uint64_t offset = 0, nbytes = 0;  // its data, relative to the data section (data_start_)
    };
    const std::unordered_map<std::string, tensor_meta> & tensor_metas() const { return tensor_meta_; }

    // A LoRA adapter (after structure()) against the tensors of its base model: what llama.cpp's
    // adapter loader reads with asserting getters, and what its graph would abort on at the first
    // decode (it checks ne[0] and ne[1] only; see the comment of validate_lora_gguf).
    void adapter(const std::unordered_map<std::string, tensor_meta> & base) {
        for (const char * key : {"general.type", "general.architecture", "adapter.type"}) {
            const kv_info * kv = find(key);
            if (kv != nullptr && kv->type != STR) {
                bad(key, kv->off, std::string("a ") + k_type_name[kv->type] + ", not a string (llama.cpp aborts reading it)");
            }
        }
        const auto type = str_key("general.type");
        if (!type || *type != "adapter") {
            bad("general.type", at("general.type"),
                (type ? "'" + std::string(*type) + "'" : std::string("missing")) + ", not 'adapter': this file is not "
                "a LoRA adapter" + (!type || *type == "model" ? " (a model file?)" : ""));
        }
        if (const kv_info * kv = find("adapter.lora.alpha")) {
            if (kv->type != F32) {
                bad("adapter.lora.alpha", kv->off, std::string("a ") + k_type_name[kv->type] + ", not an f32 (llama.cpp aborts reading it)");
            }
            const float alpha = get<float>(*kv, 0);
            if (!std::isfinite(alpha)) bad("adapter.lora.alpha", kv->off, "not a finite number");
        }
        auto ends_with = [](const std::string & s, const std::string & tail) {
            return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
        };
        // llama.cpp pairs tensors by removing every ".lora_a" / ".lora_b" from their names (the last
        // of equal names wins): only names with the suffix once, at the end, pair as they read
        for (const auto & [name, m] : tensor_meta_) {
            for (const char * tag : {".lora_a", ".lora_b"}) {
                const size_t at = name.find(tag);
                if (at != std::string::npos && at + 7 != name.size()) {
                    bad("tensor '" + name + "'", m.at, std::string("'") + tag + "' inside the name: llama.cpp would "
                        "pair this tensor under another name");
                }
            }
        }
        for (const auto & [name, a] : tensor_meta_) {
            if (!ends_with(name, ".lora_a")) continue;
            const std::string t = "tensor '" + name + "'";
            const std::string target = name.substr(0, name.size() - 7);
            const std::string tb = "tensor '" + target + ".lora_b'";
            auto bi = tensor_meta_.find(target + ".lora_b");
            if (bi == tensor_meta_.end()) continue;  // llama.cpp refuses a lone half itself
            const tensor_meta & b = bi->second;
            for (const tensor_meta * m : {&a, &b}) {
                const ggml_type ty = ggml_type(m->type);
                if (ty != GGML_TYPE_F32 && ty != GGML_TYPE_F16 && ty != GGML_TYPE_BF16 && ty != GGML_TYPE_Q8_0) {
                    bad(m == &a ? t : tb, m->at,
                        std::string("type ") + ggml_type_name(ty) + "; LoRA tensors must be f32, f16, bf16 or q8_0 "
                        "(what llama.cpp's converter writes)");
                }
                for (int d = 0; d < 4; ++d) {
                    if (m->ne[d] < 1) bad(m == &a ? t : tb, m->at, "an empty dimension");
                }
            }
            for (const tensor_meta * m : {&a, &b}) {
                if (!finite(*m)) {
                    bad(m == &a ? t : tb, m->at, "NaN or infinite values in its data (the logits would be NaN)");
                }
            }
            auto mi = base.find(target);
            if (mi == base.end()) {
                bad(t, a.at, "the model has no tensor '" + target + "': an adapter for another model");
            }
            const tensor_meta & m = mi->second;
            if (ggml_type(m.type) == GGML_TYPE_NVFP4) {
                bad(t, a.at, "the model's '" + target + "' is NVFP4, which llama.cpp cannot combine with a LoRA");
            }
            auto shape = [](const tensor_meta & x) {
                return "[" + std::to_string(x.ne[0]) + ", " + std::to_string(x.ne[1]) + ", " + std::to_string(x.ne[2]) +
                       ", " + std::to_string(x.ne[3]) + "]";
            };
            bool ok;
            if (target == "token_embd.weight" && base.count("output.weight") == 0) {
                bad(t, a.at, "this model has no output.weight: llama.cpp then uses token_embd.weight as the output "
                             "matrix too and would apply this pair there, where its shapes abort");
            }
            if (ends_with(target, "token_embd.weight")) {  // A holds rows per token, B maps the rank to n_embd
                ok = b.ne[1] == m.ne[0] && a.ne[1] == m.ne[1] && a.ne[0] == b.ne[0] && a.ne[2] == 1 && b.ne[2] == 1 &&
                     m.ne[2] == 1;
            } else {
                ok = a.ne[0] == m.ne[0] && b.ne[1] == m.ne[1] && a.ne[1] == b.ne[0] && a.ne[2] == m.ne[2] &&
                     b.ne[2] == m.ne[2];
            }
            ok = ok && a.ne[3] == 1 && b.ne[3] == 1 && m.ne[3] == 1;
            if (!ok) {
                bad(t, a.at, "lora_a " + shape(a) + " and lora_b " + shape(b) + " do not fit the model's '" + target +
                                 "' " + shape(m) + " (ggml ne order): an adapter for another model");
            }
        }
    }

private:
    // Whether a tensor's f32 / f16 / bf16 values (q8_0: its f16 block scales) are all finite.
    bool finite(const tensor_meta & m) {
        const uint64_t off = data_start_ + m.offset;
        if (!f_.need(off, m.nbytes)) return true;  // structure() checked the bounds; nothing to read
        const unsigned char * p = reinterpret_cast<const unsigned char *>(f_.at(off));
        switch (ggml_type(m.type)) {
            case GGML_TYPE_F32:
                for (uint64_t i = 0; i + 4 <= m.nbytes; i += 4) {
                    float v;
                    std::memcpy(&v, p + i, 4);
                    if (!std::isfinite(v)) return false;
                }
                return true;
            case GGML_TYPE_BF16:
                for (uint64_t i = 0; i + 2 <= m.nbytes; i += 2) {
                    if ((p[i + 1] & 0x7F) == 0x7F && (p[i] & 0x80) == 0x80) return false;
                }
                return true;
            case GGML_TYPE_F16:
            case GGML_TYPE_Q8_0: {  // q8_0: blocks of an f16 scale, then 32 int8
                const uint64_t step = ggml_type(m.type) == GGML_TYPE_F16 ? 2 : ggml_type_size(GGML_TYPE_Q8_0);
                for (uint64_t i = 0; i + step <= m.nbytes; i += step) {
                    if ((p[i + 1] & 0x7C) == 0x7C) return false;  // an f16 exponent of all ones: inf or NaN
                }
                return true;
            }
            default:
                return true;
        }
    }

    [[noreturn]] void bad(const std::string & field, uint64_t off, const std::string & reason) const {
        throw model_format_error("'" + path_ + "' is malformed at byte " + std::to_string(off) + ": " + field +
                                     ": " + reason,
                                 field, off, reason);
    }

    uint64_t left() const { return f_.size() - pos_; }

    // a field's name, built only for an error: "key" or "key[i]"
    struct name {
        name(const char * b) : base(b), index(-1) {}  // NOLINT: implicit on purpose
        name(const std::string & b, int64_t i = -1) : base(b), index(i) {}  // NOLINT
        std::string_view base;
        int64_t index;
        std::string str() const {
            return index < 0 ? std::string(base) : std::string(base) + "[" + std::to_string(index) + "]";
        }
    };

    template <typename T>
    T read(const name & field) {
        if (!f_.need(pos_, sizeof(T))) {
            bad(field.str(), pos_, "the file ends (" + std::to_string(f_.size()) + " bytes) inside this field");
        }
        T v;
        std::memcpy(&v, f_.at(pos_), sizeof(T));
        pos_ += sizeof(T);
        return v;
    }

    // a GGUF string: u64 length, then the bytes; returns the offset of the bytes and the length
    std::pair<uint64_t, uint64_t> read_str(const name & field) {
        const uint64_t at = pos_;
        const uint64_t n = read<uint64_t>(field);
        if (n > left()) {
            bad(field.str(), at, "a string of " + std::to_string(n) + " bytes, but " + std::to_string(left()) +
                                     " bytes are left in the file");
        }
        if (n > k_max_string) bad(field.str(), at, "a string of " + std::to_string(n) + " bytes; GGUF allows 1 GiB");
        if (!f_.need(pos_, n)) bad(field.str(), at, "cannot read the string");
        const uint64_t start = pos_;
        pos_ += n;
        return {start, n};
    }
    std::string_view view(uint64_t off, uint64_t n) const { return std::string_view(f_.at(off), size_t(n)); }

    void header() {
        const uint32_t magic = read<uint32_t>("magic");
        if (std::memcmp(&magic, "GGUF", 4) != 0) bad("magic", 0, "not a GGUF file (the first 4 bytes are not 'GGUF')");
        const uint32_t version = read<uint32_t>("version");
        if ((version & 0xFFFF) == 0 && version != 0) {
            bad("version", 4, std::to_string(version) + ": a byte-swapped (big-endian) file; this build reads "
                              "little-endian GGUF only");
        }
        if (version < 2 || version > 3) bad("version", 4, std::to_string(version) + "; llama.cpp reads GGUF v2 and v3");
        n_tensors_ = read<int64_t>("n_tensors");
        n_kv_ = read<int64_t>("n_kv");
        // the smallest tensor info is 8+1+4+4+8 bytes, the smallest key/value 8+1+4+1
        if (n_tensors_ < 0 || uint64_t(n_tensors_) > left() / 25) {
            bad("n_tensors", 8, std::to_string(n_tensors_) + " tensors; the " + std::to_string(left()) +
                                    " bytes left in the file cannot hold that many");
        }
        if (n_kv_ < 0 || uint64_t(n_kv_) > left() / 14) {
            bad("n_kv", 16, std::to_string(n_kv_) + " key/value pairs; the " + std::to_string(left()) +
                                " bytes left in the file cannot hold that many");
        }
    }

    void kv_pairs() {
        std::unordered_set<std::string> full_keys;
        for (int64_t i = 0; i < n_kv_; ++i) {
            const std::string where = "key/value pair " + std::to_string(i);
            const uint64_t key_at = pos_;
            auto [ko, kn] = read_str(where + " key");
            std::string full(view(ko, kn));
            if (full.empty()) bad(where, key_at, "an empty key");
            if (!full_keys.insert(full).second) bad(full, key_at, "the key appears twice");
            // llama.cpp looks keys up with strcmp, so a NUL ends one, and the first match wins
            std::string key = full.substr(0, full.find('\0'));
            kv_info kv;
            const uint64_t type_at = pos_;
            kv.type = read<uint32_t>(key);
            if (kv.type >= N_TYPES) bad(key, type_at, "value type " + std::to_string(kv.type) + " is not a GGUF type");
            uint32_t item = kv.type;
            if (kv.type == ARR) {
                kv.arr_type = item = read<uint32_t>(key);
                if (item >= N_TYPES || item == ARR) {
                    bad(key, type_at + 4, "array item type " + std::to_string(item) + " is not a GGUF scalar type");
                }
                const uint64_t n_at = pos_;
                kv.n = read<uint64_t>(key);
                const uint64_t min_size = item == STR ? 8 : k_type_size[item];
                if (kv.n > k_max_array) {
                    bad(key, n_at, "an array of " + std::to_string(kv.n) + " items; GGUF allows 2^30");
                }
                if (kv.n > left() / min_size) {
                    bad(key, n_at, "an array of " + std::to_string(kv.n) + " items, but " + std::to_string(left()) +
                                       " bytes are left in the file");
                }
            }
            kv.off = pos_;
            if (item == STR) {
                const bool keep = key == "tokenizer.ggml.tokens";
                if (keep) token_off_.reserve(size_t(kv.n));
                for (uint64_t j = 0; j < kv.n; ++j) {
                    auto [so, sn] = read_str({key, kv.type == ARR ? int64_t(j) : -1});
                    if (keep) token_off_.push_back({so, sn});
                }
            } else {
                const uint64_t n = kv.n * k_type_size[item];
                if (!f_.need(pos_, n)) bad(key, pos_, "the file ends inside the value");
                pos_ += n;
            }
            if (kv_.count(key) == 0) kv_.emplace(std::move(key), kv);
        }
        if (const kv_info * a = find("general.alignment")) {
            if (a->type != U32) bad("general.alignment", a->off, std::string("a ") + k_type_name[a->type] + ", not a u32");
            align_ = get<uint32_t>(*a, 0);
            if (align_ == 0 || (align_ & (align_ - 1)) != 0) {
                bad("general.alignment", a->off, std::to_string(align_) + " is not a power of 2");
            }
        }
    }

    void tensors() {
        struct info { std::string name; uint64_t nbytes, offset, at; };
        std::vector<info> infos;
        infos.reserve(size_t(std::min<int64_t>(n_tensors_, 1 << 16)));
        std::unordered_set<std::string> names;
        for (int64_t i = 0; i < n_tensors_; ++i) {
            const uint64_t at = pos_;
            auto [no, nn] = read_str("tensor " + std::to_string(i) + " name");
            std::string name(view(no, nn));
            const std::string t = "tensor '" + name + "'";
            if (nn >= k_max_name) bad(t, at, "the name has " + std::to_string(nn) + " bytes; ggml allows 63");
            if (!names.insert(name).second) bad(t, at, "two tensors have this name");
            const uint64_t dims_at = pos_;
            const uint32_t n_dims = read<uint32_t>(t);
            if (n_dims > 4) bad(t, dims_at, std::to_string(n_dims) + " dimensions; ggml has at most 4");
            int64_t ne[4] = {1, 1, 1, 1};
            int64_t nel = 1;
            for (uint32_t d = 0; d < n_dims; ++d) {
                ne[d] = read<int64_t>(t);
                if (ne[d] < 0) bad(t, pos_ - 8, "dimension " + std::to_string(d) + " is " + std::to_string(ne[d]));
            }
            for (int d = 0; d < 4; ++d) {
                if (ne[d] != 0 && nel > INT64_MAX / ne[d]) bad(t, dims_at, "the element count overflows int64");
                nel *= ne[d];
            }
            const uint64_t type_at = pos_;
            const uint32_t type = read<uint32_t>(t);
            if (type >= GGML_TYPE_COUNT || ggml_blck_size(ggml_type(type)) == 0) {
                bad(t, type_at, "type " + std::to_string(type) + " is not a ggml tensor type");
            }
            const int64_t blck = ggml_blck_size(ggml_type(type));
            const uint64_t tsize = ggml_type_size(ggml_type(type));
            if (ne[0] % blck != 0) {
                bad(t, dims_at, "rows of " + std::to_string(ne[0]) + " elements are not whole blocks of " +
                                    std::to_string(blck) + " (" + ggml_type_name(ggml_type(type)) + ")");
            }
            if (uint64_t(nel / blck) > (UINT64_MAX - align_) / tsize) bad(t, dims_at, "the byte size overflows");
            const uint64_t offset = read<uint64_t>(t);
            tensor_meta_.emplace(name, tensor_meta{{ne[0], ne[1], ne[2], ne[3]}, type, at, offset, uint64_t(nel / blck) * tsize});
            infos.push_back({std::move(name), uint64_t(nel / blck) * tsize, offset, pos_ - 8});
        }
        const uint64_t data = n_tensors_ > 0 ? (pos_ + align_ - 1) / align_ * align_ : pos_;
        data_start_ = data;
        uint64_t expect = 0;
        for (const info & ti : infos) {
            const std::string t = "tensor '" + ti.name + "'";
            if (ti.offset != expect) {
                bad(t, ti.at, "data offset " + std::to_string(ti.offset) + ", expected " + std::to_string(expect) +
                                  " (tensors follow each other, each padded to " + std::to_string(align_) + " bytes)");
            }
            if (ti.nbytes > f_.size() || data + ti.offset > f_.size() - ti.nbytes) {
                bad(t, ti.at, "its " + std::to_string(ti.nbytes) + " bytes at " + std::to_string(data + ti.offset) +
                                  " end past the end of the file (" + std::to_string(f_.size()) + " bytes)");
            }
            if ((data + ti.offset) % k_tensor_alignment != 0) {
                bad(t, ti.at, "its data starts at byte " + std::to_string(data + ti.offset) + ", not a multiple of " +
                                  std::to_string(k_tensor_alignment) + ": ggml maps tensor data in place and aborts on "
                                  "unaligned data (general.alignment " + std::to_string(align_) + ")");
            }
            const uint64_t padded = (ti.nbytes + align_ - 1) / align_ * align_;
            if (padded > UINT64_MAX - expect) bad(t, ti.at, "the data section size overflows");
            expect += padded;
        }
    }

    const kv_info * find(const std::string & key) const {
        auto it = kv_.find(key);
        return it == kv_.end() ? nullptr : &it->second;
    }

    template <typename T>
    T get(const kv_info & kv, uint64_t i) const {
        T v;
        std::memcpy(&v, f_.at(kv.off + i * sizeof(T)), sizeof(T));
        return v;
    }
    // item i of an integer value or array, widened
    int64_t get_int(const kv_info & kv, uint64_t i, uint32_t t) const {
        switch (t) {
            case U8: return get<uint8_t>(kv, i);
            case I8: return get<int8_t>(kv, i);
            case U16: return get<uint16_t>(kv, i);
            case I16: return get<int16_t>(kv, i);
            case U32: return get<uint32_t>(kv, i);
            case I32: return get<int32_t>(kv, i);
            case U64: return int64_t(std::min<uint64_t>(get<uint64_t>(kv, i), uint64_t(INT64_MAX)));
            default: return get<int64_t>(kv, i);
        }
    }
    // an integer key: nullopt when absent or not an integer (llama.cpp's typed getters refuse those)
    std::optional<int64_t> int_key(const std::string & key) const {
        const kv_info * kv = find(key);
        if (kv == nullptr || !is_int(kv->type)) return std::nullopt;
        return get_int(*kv, 0, kv->type);
    }
    // a per-layer key (a scalar, or an array of one value per layer, as get_key_or_arr reads it)
    std::optional<std::vector<int64_t>> layer_key(const std::string & key, int64_t n_layer) const {
        const kv_info * kv = find(key);
        if (kv == nullptr) return std::nullopt;
        if (is_int(kv->type)) return std::vector<int64_t>(size_t(n_layer), get_int(*kv, 0, kv->type));
        // get_arr reads bool arrays into integer per-layer values too
        const bool ints = is_int(kv->arr_type) || kv->arr_type == BOOL;
        if (kv->type != ARR || !ints || kv->n > uint64_t(n_layer)) return std::nullopt;
        std::vector<int64_t> v(size_t(n_layer), 0);
        const uint32_t t = kv->arr_type == BOOL ? U8 : kv->arr_type;
        for (uint64_t i = 0; i < kv->n; ++i) v[i] = get_int(*kv, i, t);
        return v;
    }
    std::optional<std::string_view> str_key(const std::string & key) const {
        const kv_info * kv = find(key);
        if (kv == nullptr || kv->type != STR) return std::nullopt;
        const uint64_t n = get<uint64_t>(*kv, 0);
        const std::string_view s = view(kv->off + 8, n);
        return s.substr(0, s.find('\0'));  // llama.cpp reads it as a C string
    }
    // where a key's value starts; for a missing key, where the key that needs it does
    uint64_t at(const std::string & key, const std::string & needed_by = "") const {
        if (const kv_info * kv = find(key)) return kv->off;
        return needed_by.empty() ? 0 : at(needed_by);
    }

    void range(const std::string & key, int64_t v, int64_t lo, int64_t hi, const std::string & why,
               const std::string & needed_by = "") const {
        if (v < lo || v > hi) {
            const std::string shown = find(key) ? std::to_string(v) : "missing (" + std::to_string(v) + ")";
            bad(key, at(key, needed_by), shown + "; " + why + " (" + std::to_string(lo) + " to " + std::to_string(hi) + ")");
        }
    }

    void hparams() {
        const kv_info * a = find("general.architecture");
        if (a == nullptr || a->type != STR) return;  // llama.cpp raises "unknown model architecture"
        const std::string arch(*str_key("general.architecture"));
        const std::string p = arch + ".";

        const auto n_layer = int_key(p + "block_count");
        if (n_layer) range(p + "block_count", *n_layer, 1, k_max_layers, "llama.cpp supports this many layers");
        const int64_t nl = n_layer.value_or(0);
        const int64_t nextn = int_key(p + "nextn_predict_layers").value_or(0);
        range(p + "nextn_predict_layers", nextn, 0, nl, "at most block_count");
        if (auto v = int_key(p + "context_length")) range(p + "context_length", *v, 1, INT32_MAX, "a context length");
        if (auto v = int_key(p + "embedding_length")) range(p + "embedding_length", *v, 1, INT32_MAX, "an embedding size");

        // experts (load_hparams' asserts); HunYuan's dense models count one expert as none
        int64_t n_expert = int_key(p + "expert_count").value_or(0);
        range(p + "expert_count", n_expert, 0, k_max_experts, "llama.cpp supports this many experts");
        const bool hunyuan_dense = arch == "hunyuan-dense" || arch == "hunyuan_vl";
        int64_t used_max = 0;
        if (nl > 0 && !(hunyuan_dense && n_expert <= 1)) {
            if (auto used = layer_key(p + "expert_used_count", nl)) {
                for (int64_t u : *used) used_max = std::max(used_max, u);
                for (int64_t u : *used) range(p + "expert_used_count", u, 0, INT32_MAX, "an expert count");
            }
        }
        if (hunyuan_dense && n_expert <= 1) n_expert = 0;
        const int64_t groups = int_key(p + "expert_group_count").value_or(0);
        const int64_t group_used = int_key(p + "expert_group_used_count").value_or(0);
        if (n_expert > 0) {
            const std::string ec = p + "expert_count";
            range(p + "expert_used_count", used_max, 1, n_expert, "experts used per token, at most expert_count", ec);
            range(p + "expert_group_count", groups, 0, n_expert - 1, "fewer groups than experts", ec);
            if (groups > 1) {
                if (n_expert % groups != 0) bad(p + "expert_group_count", at(p + "expert_group_count"),
                                                std::to_string(groups) + " groups do not divide " +
                                                    std::to_string(n_expert) + " experts");
                range(p + "expert_group_used_count", group_used, 1, groups - 1, "groups used, fewer than the groups",
                      p + "expert_group_count");
            }
        } else {
            range(p + "expert_used_count", used_max, 0, 0, "experts used without expert_count");
            range(p + "expert_group_count", groups, 0, 0, "expert groups without expert_count");
        }

        if (auto s = str_key(p + "rope.scaling.type")) {
            if (*s != "none" && *s != "linear" && *s != "yarn" && *s != "longrope") {
                bad(p + "rope.scaling.type", at(p + "rope.scaling.type"),
                    "'" + std::string(*s) + "'; llama.cpp knows none, linear, yarn and longrope");
            }
        }

        if (nl > 0) {
            heads(p, arch, nl);
            sliding_window(p, nl - nextn);
        }

        // every epsilon under the architecture's prefix (layer_norm_epsilon, ..._rms_epsilon,
        // hyper_connection.epsilon, ...)
        for (const auto & [key, kv] : kv_) {
            if (key.compare(0, p.size(), p) != 0 || key.size() < 7 || key.compare(key.size() - 7, 7, "epsilon") != 0) continue;
            if (kv.type != F32) continue;  // llama.cpp's typed getter refuses other types
            const float eps = get<float>(kv, 0);
            if (!std::isfinite(eps) || eps <= 0.0f) bad(key, kv.off, std::to_string(eps) + "; it must be finite and > 0");
        }
    }

    // attention heads, per layer (a scalar or one value per layer)
    void heads(const std::string & p, const std::string & arch, int64_t nl) const {
        const auto heads = layer_key(p + "attention.head_count", nl);
        const auto heads_kv = layer_key(p + "attention.head_count_kv", nl);
        if (!heads) return;
        // dense transformers: every layer has attention (gemma3's 27B size divides by head_count)
        const bool all_attention = arch == "llama" || arch == "gemma" || arch == "gemma2" || arch == "gemma3";
        for (int64_t il = 0; il < nl; ++il) {
            const int64_t h = (*heads)[size_t(il)];
            range(p + "attention.head_count", h, all_attention ? 1 : 0, 1 << 20,
                  all_attention ? "every layer of " + arch + " has attention heads" : "a head count");
            if (!heads_kv || h == 0) continue;  // no attention in this layer (recurrent layers, RWKV)
            const int64_t hk = (*heads_kv)[size_t(il)];
            const std::string where = " (layer " + std::to_string(il) + ")";
            range(p + "attention.head_count_kv", hk, 1, h, "KV heads of a layer with attention, at most head_count" + where);
            if (h % hk != 0) {
                bad(p + "attention.head_count_kv", at(p + "attention.head_count_kv"),
                    std::to_string(hk) + " KV heads do not divide " + std::to_string(h) + " heads" + where);
            }
        }
        const int64_t h0 = (*heads)[0];
        if (h0 <= 0) return;
        // head sizes and rotary dimensions, for full and sliding-window (_swa) layers
        const auto n_embd = int_key(p + "embedding_length");
        auto head_size = [&](const std::string & key, int64_t otherwise) {  // checked when present
            const auto v = int_key(p + key);
            if (v) range(p + key, *v, 1, 1 << 20, "a head size");
            return v.value_or(otherwise);
        };
        const int64_t head_k = head_size("attention.key_length", n_embd ? *n_embd / h0 : 0);
        head_size("attention.value_length", 0);
        const int64_t head_k_swa = head_size("attention.key_length_swa", head_k);
        head_size("attention.value_length_swa", 0);
        for (const auto & [key, hk] : {std::make_pair(p + "rope.dimension_count", head_k),
                                      std::make_pair(p + "rope.dimension_count_swa", head_k_swa)}) {
            const auto r = int_key(key);
            if (!r || hk <= 0) continue;
            range(key, *r, 0, hk, "rotary dimensions, at most the head size");
            if (*r % 2 != 0) bad(key, at(key), std::to_string(*r) + " is odd; RoPE rotates pairs");
        }
    }

    // A sliding window with a layer pattern that leaves no sliding-window layer: context creation
    // asserts is_swa_any(). The pattern is an array (per layer) or a period n, whose last layer of
    // each n is a full one (n = 1: none slides).
    void sliding_window(const std::string & p, int64_t n_layer) const {
        const std::string key = p + "attention.sliding_window_pattern";
        const auto window = int_key(p + "attention.sliding_window");
        const kv_info * kv = find(key);
        if (!window || *window <= 0 || kv == nullptr) return;
        bool any = false;
        if (kv->type == ARR) {
            const auto v = layer_key(key, k_max_layers);
            if (!v) return;
            for (int64_t il = 0; il < std::min<int64_t>(n_layer, int64_t(kv->n)); ++il) any = any || (*v)[size_t(il)] != 0;
        } else if (is_int(kv->type)) {
            any = get_int(*kv, 0, kv->type) != 1 && n_layer > 0;
        } else {
            return;
        }
        if (!any) {
            bad(key, kv->off, "a sliding window of " + std::to_string(*window) + " tokens, but this pattern makes none of the " +
                                  std::to_string(n_layer) + " layers a sliding-window one");
        }
    }

    void vocab() {
        const std::string tokens = "tokenizer.ggml.tokens";
        const kv_info * tk = find(tokens);
        if (tk == nullptr) return;
        if (tk->type != ARR || tk->arr_type != STR) bad(tokens, tk->off, "not an array of strings");
        const uint64_t n = tk->n;
        if (n > uint64_t(INT32_MAX)) bad(tokens, tk->off, std::to_string(n) + " tokens; llama_token is an int32");
        const auto model = str_key("tokenizer.ggml.model");
        if (model && (*model == "none" || *model == "no_vocab")) return;  // llama.cpp reads no tokens
        for (const char * key : {"tokenizer.ggml.scores", "tokenizer.ggml.token_type"}) {
            const kv_info * kv = find(key);
            if (kv == nullptr) continue;
            const bool scores = key[15] == 's';
            const bool ok_type = kv->type == ARR && (kv->arr_type == I32 || (scores && kv->arr_type == F32));
            if (!ok_type) bad(key, kv->off, scores ? "not an array of f32 or i32" : "not an array of i32");
            if (kv->n < n) bad(key, kv->off, std::to_string(kv->n) + " items for " + std::to_string(n) + " tokens");
        }

        // byte tokens (type 6), by what the declared tokenizer does with them: SentencePiece, Unigram
        // and the BPE family parse "<0xNN>" (token_to_byte's substr(3, 2)); WordPiece aborts on any
        const kv_info * types = find("tokenizer.ggml.token_type");
        if (model && types != nullptr) {
            const std::string_view m = *model;
            const bool parses = m == "llama" || m == "t5" || m == "gpt2" || m == "hybriddna" || m == "whitespace" ||
                                m == "gemma4";
            bool seen[256] = {};
            for (uint64_t i = 0; i < n; ++i) {
                if (get<int32_t>(*types, i) != 6) continue;  // LLAMA_TOKEN_TYPE_BYTE
                const std::string_view s = token_text(i);
                const std::string field = tokens + "[" + std::to_string(i) + "]";
                if (m == "bert") {
                    bad(field, token_off_[i].first, "a byte token (type 6) in a WordPiece (bert) vocabulary, which "
                                                    "has none: llama.cpp aborts on it");
                }
                if (!parses) continue;
                auto hex = [](char c) { return (c >= '0' && c <= '9') ? c - '0' : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1; };
                const bool ok = s.size() == 6 && s.compare(0, 3, "<0x") == 0 && s[5] == '>' && hex(s[3]) >= 0 && hex(s[4]) >= 0;
                if (!ok) {
                    bad(field, token_off_[i].first, "a byte token (type 6) must read <0xNN> with upper-case hex digits, not '" +
                                                        printable(s) + "'");
                }
                const int b = hex(s[3]) * 16 + hex(s[4]);
                if (seen[b]) bad(field, token_off_[i].first, "a second byte token for " + std::string(s));
                seen[b] = true;
            }
        }
        if (model && *model == "rwkv") rwkv_bytes(tokens, n);
        duplicates(tokens, n);
    }

    // RWKV's greedy trie tokenizer restarts from the beginning when a byte starts some token but
    // no token ends on the way (llm_tokenizer_rwkv_session: token_length stays 0): it loops forever,
    // already at load (tokenize("\n")). A byte that starts a token must be a token of its own.
    void rwkv_bytes(const std::string & tokens, uint64_t n) const {
        auto first_byte = [](std::string_view t, int & b) {  // llama_unescape_rwkv_token's first byte
            if (t.empty()) return false;
            if (t[0] != '\\') { b = (unsigned char) t[0]; return true; }
            if (t.size() < 2) return false;
            switch (t[1]) {
                case 't': b = '\t'; return true;
                case 'n': b = '\n'; return true;
                case 'r': b = '\r'; return true;
                case 'x': {
                    if (t.size() < 4) return false;
                    auto v = [](char c) { return (c >= 'a') ? (c - 'a' + 10) : (c - '0'); };
                    b = (v(t[2]) * 16 + v(t[3])) & 0xFF;
                    return true;
                }
                default: b = (unsigned char) t[1]; return true;
            }
        };
        auto unescaped_size = [](std::string_view t) {  // 1 for a one-byte token
            size_t out = 0;
            for (size_t i = 0; i < t.size(); ++i, ++out) {
                if (t[i] == '\\' && i + 1 < t.size()) i += (t[i + 1] == 'x') ? 3 : 1;
            }
            return out;
        };
        bool starts[256] = {}, single[256] = {};
        uint64_t where[256] = {};
        for (uint64_t i = 0; i < n; ++i) {
            const std::string_view t = token_text(i);
            int b = 0;
            if (!first_byte(t, b)) continue;
            if (!starts[b]) where[b] = token_off_[i].first;
            starts[b] = true;
            if (unescaped_size(t) == 1) single[b] = true;
        }
        for (int b = 0; b < 256; ++b) {
            if (starts[b] && !single[b]) {
                bad(tokens, where[b], "an RWKV vocabulary where byte " + std::to_string(b) + " starts a token but is "
                                      "not a token itself: llama.cpp's RWKV tokenizer never ends on such text");
            }
        }
    }

    // A token's text as llama.cpp reads it: gguf_get_arr_str returns a C string, so a NUL ends it.
    std::string_view token_text(uint64_t i) const {
        const std::string_view s = view(token_off_[i].first, token_off_[i].second);
        return s.substr(0, s.find('\0'));
    }

    // No two token texts may be equal. Open addressing over FNV-1a hashes (the sort of hashes
    // this replaced cost 20 ms on 262k tokens).
    void duplicates(const std::string & tokens, uint64_t n) const {
        if (n < 2) return;
        if (n > SIZE_MAX / 32) bad(tokens, token_off_[0].first, "too many tokens for this process's address space");
        size_t cap = 1;
        while (cap < 2 * n) cap <<= 1;
        std::vector<uint64_t> slot(cap, 0);  // (upper 32 bits of the hash) << 32 | (index + 1); 0: empty
        auto text = [&](uint32_t i, std::string & tmp) -> std::string_view {
            const std::string_view s = token_text(i);
            if (!s.empty()) return s;
            tmp = "[EMPTY_" + std::to_string(i) + "]";  // llama_vocab::load renames empty tokens so
            return tmp;
        };
        // hash every text first (a sequential pass), then insert with the slot of a later token
        // prefetched: the table is bigger than the cache, and a miss per token was most of the time
        std::vector<uint64_t> hashes(n);
        std::string ta, tb;
        for (uint32_t i = 0; i < uint32_t(n); ++i) {
            uint64_t h = 1469598103934665603ull;
            for (unsigned char c : text(i, ta)) h = (h ^ c) * 1099511628211ull;
            hashes[i] = h;
        }
        auto home = [&](uint64_t h) { return size_t(h ^ (h >> 29)) & (cap - 1); };
        constexpr uint32_t ahead = 16;
        for (uint32_t i = 0; i < uint32_t(n); ++i) {
#if defined(__GNUC__)
            if (i + ahead < n) __builtin_prefetch(&slot[home(hashes[i + ahead])], 1);
#endif
            const uint64_t h = hashes[i];
            const uint64_t tag = h & 0xFFFFFFFF00000000ull;
            for (size_t j = home(h);; j = (j + 1) & (cap - 1)) {
                const uint64_t e = slot[j];
                if (e == 0) {
                    slot[j] = tag | (uint64_t(i) + 1);
                    break;
                }
                const uint32_t k = uint32_t(e) - 1;
                if ((e & 0xFFFFFFFF00000000ull) == tag && text(k, tb) == text(i, ta)) {
                    const std::string_view s = text(i, ta);
                    bad(tokens, token_off_[i].first, "tokens " + std::to_string(k) + " and " + std::to_string(i) +
                                                         " have the same text '" + printable(s) + "'");
                }
            }
        }
    }

    static std::string printable(std::string_view s) {
        std::string out;
        for (unsigned char c : s.substr(0, 32)) {
            if (c >= 0x20 && c < 0x7f) {
                out += char(c);
            } else {
                char b[5];
                std::snprintf(b, sizeof b, "\\x%02x", c);
                out += b;
            }
        }
        return s.size() > 32 ? out + "..." : out;
    }

    std::string path_;
    meta_file f_;
    uint64_t pos_ = 0;
    int64_t n_tensors_ = 0, n_kv_ = 0;
    uint32_t align_ = 32;  // GGUF_DEFAULT_ALIGNMENT
    std::unordered_map<std::string, kv_info> kv_;
    std::vector<std::pair<uint64_t, uint64_t>> token_off_;  // offset and length of each token text
    std::unordered_map<std::string, tensor_meta> tensor_meta_;
    uint64_t data_start_ = 0;
};

// Files validated in this process, by identity and modification time: Model() validates in
// Python (before the memory fit reads the file) and again in the native constructor.
struct seen_file {
    std::string path;
    uint64_t size;
    int64_t mtime, ctime;
    uint64_t inode;
    bool operator==(const seen_file & o) const {
        return path == o.path && size == o.size && mtime == o.mtime && ctime == o.ctime && inode == o.inode;
    }
};
std::mutex g_seen_mu;
std::vector<seen_file> g_seen;

std::optional<seen_file> identity(const std::string & path) {
    std::error_code ec;
    const auto canon = std::filesystem::canonical(path, ec);
    if (ec) return std::nullopt;
#if defined(_WIN32)
    const uint64_t size = std::filesystem::file_size(canon, ec);
    if (ec) return std::nullopt;
    const auto mtime = std::filesystem::last_write_time(canon, ec);
    if (ec) return std::nullopt;
    return seen_file{canon.string(), size, int64_t(mtime.time_since_epoch().count()), 0, 0};
#else
    struct stat sb {};
    if (::stat(canon.c_str(), &sb) != 0) return std::nullopt;
    // the change time too: a restored modification time does not hide a rewrite
#if defined(__APPLE__)
    const int64_t m = int64_t(sb.st_mtimespec.tv_sec) * 1000000000 + sb.st_mtimespec.tv_nsec;
    const int64_t c = int64_t(sb.st_ctimespec.tv_sec) * 1000000000 + sb.st_ctimespec.tv_nsec;
#else
    const int64_t m = int64_t(sb.st_mtim.tv_sec) * 1000000000 + sb.st_mtim.tv_nsec;
    const int64_t c = int64_t(sb.st_ctim.tv_sec) * 1000000000 + sb.st_ctim.tv_nsec;
#endif
    return seen_file{canon.string(), uint64_t(sb.st_size), m, c, uint64_t(sb.st_ino)};
#endif
}

}  // namespace

void validate_gguf(const std::string & path) {
    const auto id = identity(path);
    if (id) {
        std::lock_guard<std::mutex> lock(g_seen_mu);
        if (std::find(g_seen.begin(), g_seen.end(), *id) != g_seen.end()) return;
    }
    validator v(path);
    v.run();
    const std::vector<std::string> splits = v.other_splits();
    for (const std::string & split : splits) {
        std::error_code ec;
        if (std::filesystem::exists(split, ec)) validator(split).structure();  // missing: llama.cpp says so
    }
    if (id && splits.empty()) {  // a split model is validated every time: its other files may change
        std::lock_guard<std::mutex> lock(g_seen_mu);
        if (g_seen.size() >= 16) g_seen.erase(g_seen.begin());
        g_seen.push_back(*id);
    }
}

// A LoRA adapter for the model in model_path. llama.cpp's loader (llama-adapter.cpp) reads
// general.type, general.architecture and adapter.type with gguf_get_val_str and adapter.lora.alpha
// with gguf_get_val_f32, which abort on another type; it checks a pair's ne[0] and ne[1] against
// the model's tensor but not ne[2] / ne[3], nor token_embd's rank, nor the types: ggml_mul_mat /
// ggml_get_rows then abort in the first decode's graph (or a 3-D expert adapter reads past its
// experts). The model's tensors come from its file (and split files), as it was loaded.
std::string file_identity(const std::string & path) {
    const auto id = identity(path);
    if (!id) return {};
    return id->path + "|" + std::to_string(id->size) + "|" + std::to_string(id->mtime) + "|" +
           std::to_string(id->ctime) + "|" + std::to_string(id->inode);
}

void validate_lora_gguf(const std::string & path, const std::string & model_path, const std::string & model_identity) {
    if (model_identity.empty() || file_identity(model_path) != model_identity) {
        throw load_error("the model file '" + model_path + "' is gone or changed since the model was loaded: its "
                         "tensors cannot be checked against the adapter's; load the model again");
    }
    validator a(path);
    a.structure();
    std::unordered_map<std::string, validator::tensor_meta> base;
    {
        validator m(model_path);
        m.structure();
        base = m.tensor_metas();
        for (const std::string & split : m.other_splits()) {
            validator s(split);
            s.structure();
            base.insert(s.tensor_metas().begin(), s.tensor_metas().end());
        }
    }
    a.adapter(base);
}

}  // namespace lamina
