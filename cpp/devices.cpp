// Devices exposed by the loaded ggml backends.
#include "lamina.h"

#include "ggml-backend.h"

#include "ggml-rpc.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#ifndef MSG_NOSIGNAL  // macOS: no SIGPIPE flag per call (a closed peer makes send() fail with EPIPE there
#define MSG_NOSIGNAL 0  // only when SIGPIPE is ignored, which Python does)
#endif

namespace lamina {
namespace {

// ggml's RPC client aborts the process when it cannot connect, and when the server's handshake
// fails (another protocol version). Before the first connection to a server, lamina connects
// itself (timeout_ms), says HELLO the way ggml does and checks the version, and raises instead.
// (Not a liveness check for later: the server serves one client at a time, so probes then queue.)
int connect_timeout(const std::string & endpoint, int timeout_ms) {
    size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos) return -1;
    std::string host = endpoint.substr(0, colon), port = endpoint.substr(colon + 1);
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * res = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) return -1;
    int ok_fd = -1;
    for (addrinfo * a = res; a != nullptr && ok_fd < 0; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) continue;
        const int flags = fcntl(fd, F_GETFL, 0);
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);  // (portable: SOCK_NONBLOCK is Linux-only)
        int rc = connect(fd, a->ai_addr, a->ai_addrlen);
        bool ok = rc == 0;
        if (!ok && errno == EINPROGRESS) {
            pollfd p{fd, POLLOUT, 0};
            if (poll(&p, 1, timeout_ms) == 1) {
                int err = 0;
                socklen_t len = sizeof(err);
                ok = getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
            }
        }
        if (ok) {
            fcntl(fd, F_SETFL, flags);  // blocking again, with time limits on each send and receive
            timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
            ok_fd = fd;
        } else {
            close(fd);
        }
    }
    freeaddrinfo(res);
    return ok_fd;
}

bool io_all(int fd, void * data, size_t n, bool sending) {
    auto * p = static_cast<uint8_t *>(data);
    while (n > 0) {
        ssize_t k = sending ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k <= 0) return false;
        p += k;
        n -= size_t(k);
    }
    return true;
}

// "" when a server that speaks this build's RPC protocol answers at endpoint, else why not.
// The wire format is ggml-rpc.cpp's: | cmd (1 byte) | size (8 bytes) | request |, then
// | size (8 bytes) | response |; HELLO is command 14 in every version (ggml asserts it), its
// request 24 bytes of transport capabilities (zeros: plain TCP), its response major, minor, patch.
std::string rpc_handshake(const std::string & endpoint, int timeout_ms) {
    int fd = connect_timeout(endpoint, timeout_ms);
    if (fd < 0) {
        return "nothing answers there (connection refused, or no answer within " + std::to_string(timeout_ms) + " ms)";
    }
    uint8_t cmd = 14;
    uint64_t size = 24;
    uint8_t caps[24] = {};
    std::string why;
    if (!io_all(fd, &cmd, 1, true) || !io_all(fd, &size, 8, true) || !io_all(fd, caps, sizeof(caps), true)) {
        why = "the connection broke during the RPC handshake";
    } else if (!io_all(fd, &size, 8, false)) {
        why = "no RPC handshake answer within " + std::to_string(timeout_ms) +
              " ms: not a ggml RPC server, or one whose protocol predates version " +
              std::to_string(RPC_PROTO_MAJOR_VERSION) + " (it closed the connection or said nothing)";
    } else {
        uint8_t rsp[64] = {};
        const size_t take = size_t(std::min<uint64_t>(size, sizeof(rsp)));
        if (size < 3 || !io_all(fd, rsp, take, false)) {
            why = "a malformed RPC handshake answer (" + std::to_string(size) + " bytes)";
        } else if (rsp[0] != RPC_PROTO_MAJOR_VERSION || rsp[1] > RPC_PROTO_MINOR_VERSION) {
            why = "the server speaks RPC protocol " + std::to_string(rsp[0]) + "." + std::to_string(rsp[1]) + "." +
                  std::to_string(rsp[2]) + ", this lamina " + std::to_string(RPC_PROTO_MAJOR_VERSION) + "." +
                  std::to_string(RPC_PROTO_MINOR_VERSION) + "." + std::to_string(RPC_PROTO_PATCH_VERSION) +
                  ": start it from the same lamina (lamina rpc-server), or the same llama.cpp build";
        }
    }
    close(fd);
    return why;
}

const char * dev_type_name(enum ggml_backend_dev_type t) {
    switch (t) {
        case GGML_BACKEND_DEVICE_TYPE_CPU:   return "cpu";
        case GGML_BACKEND_DEVICE_TYPE_GPU:   return "gpu";
        case GGML_BACKEND_DEVICE_TYPE_IGPU:  return "igpu";
        case GGML_BACKEND_DEVICE_TYPE_ACCEL: return "accel";
        case GGML_BACKEND_DEVICE_TYPE_META:  return "meta";
    }
    return "unknown";
}

using rpc_failures_fn = int (*)(char * lost_endpoints, size_t size);
std::atomic<rpc_failures_fn> g_rpc_failures{nullptr};  // lamina's ggml-rpc patch, found at first connect

// ";host:port;host:port;" of every server lost in this process ("" when none or unpatched), copied
// under the patch's lock: whole endpoints match (";a:1;"), never a suffix
std::string lost_endpoints() {
    rpc_failures_fn fn = g_rpc_failures.load();
    if (fn == nullptr || fn(nullptr, 0) == 0) return std::string();  // the common case
    std::string all(64 * 1024, '\0');
    fn(all.data(), all.size());
    all.resize(std::strlen(all.c_str()));
    return ";" + all;
}

}  // namespace

std::vector<std::string> rpc_endpoints_of(const std::vector<ggml_backend_dev_t> & devs) {
    std::vector<std::string> out;
    for (ggml_backend_dev_t d : devs) {
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(d);
        if (reg != nullptr && std::string(ggml_backend_reg_name(reg)).rfind("RPC", 0) == 0) {
            out.emplace_back(ggml_backend_dev_description(d));
        }
    }
    return out;
}

// Whether this endpoint ("host:port") was lost in this process (lamina's ggml-rpc patch).
bool rpc_endpoint_lost(const std::string & endpoint) {
    return lost_endpoints().find(";" + endpoint + ";") != std::string::npos;
}

void refuse_lost_rpc(const std::vector<ggml_backend_dev_t> & devs, const std::string & when) {
    for (const std::string & ep : rpc_endpoints_of(devs)) {
        if (!rpc_endpoint_lost(ep)) continue;
        PyErr_SetString(PyExc_ConnectionError, ("RPC server " + ep + " went away (it crashed, exited or sent a malformed "
                         "answer) " + when + "; lamina does not connect to a lost server again").c_str());
        throw nb::python_error();
    }
}

bool rpc_lost(model_state & model) {
    if (model.lost.load()) return true;
    const std::string all = lost_endpoints();
    if (all.empty()) return false;
    for (const std::string & ep : model.rpc_endpoints) {
        if (all.find(";" + ep + ";") != std::string::npos) {
            std::lock_guard<std::mutex> lock(model.lost_mutex);
            if (!model.lost.load()) {
                model.lost_why = "RPC server " + ep + " went away (it crashed, exited or sent a malformed answer); "
                                 "the model " + model.path + " held layers there and is closed";
                model.lost.store(true);
            }
            return true;
        }
    }
    return false;
}

ggml_backend_dev_t device_named(const std::string & name) {
    // RPC buffers are named "RPC<k>[host:port]": the k-th device of that server, whose global name
    // ("RPC<n>") is another number once several servers are connected
    const size_t open = name.find('['), close = name.rfind(']');
    if (name.rfind("RPC", 0) == 0 && open != std::string::npos && close != std::string::npos && close > open) {
        const std::string endpoint = name.substr(open + 1, close - open - 1);
        const int k = std::atoi(name.c_str() + 3);
        int seen = 0;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (endpoint == ggml_backend_dev_description(dev) && seen++ == k) return dev;
        }
    }
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const std::string dn = ggml_backend_dev_name(dev);
        if (name == dn || name.rfind(dn + "[", 0) == 0 || name.rfind(dn + "_", 0) == 0) return dev;
    }
    return nullptr;
}

void init_devices(nb::module_ & m) {
    m.def("rpc_add_server", [](const std::string & endpoint, int timeout_ms) {
        static std::vector<std::string> added;  // ggml returns the same registry again: register once
        ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
        if (rpc == nullptr) {
            throw lamina_error("this build has no RPC backend: rebuild with -Ccmake.define.GGML_RPC=ON");
        }
        auto add = reinterpret_cast<ggml_backend_reg_t (*)(const char *)>(
            ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server"));
        if (add == nullptr) throw lamina_error("the RPC backend has no ggml_backend_rpc_add_server");
        auto lost = [&](const std::string & how) {
            PyErr_SetString(PyExc_ConnectionError, ("RPC server " + endpoint + " " + how + " (it crashed, exited or "
                "sent a malformed answer); lamina does not connect to a lost server again: restart the process").c_str());
            throw nb::python_error();
        };
        if (rpc_endpoint_lost(endpoint)) lost("went away earlier in this process");
        if (std::find(added.begin(), added.end(), endpoint) != added.end()) {
            // known: one round trip (over the open connection, else a new one) tells a server that
            // went away while nothing was connected; a second handshake could wait behind the open
            // one, but a plain connect answers within timeout_ms (ggml's own connect has no limit)
            const int fd = without_gil([&] { return connect_timeout(endpoint, timeout_ms); });
            if (fd < 0) {
                PyErr_SetString(PyExc_ConnectionError, ("RPC server " + endpoint + ": nothing answers there (connection "
                                 "refused, or no answer within " + std::to_string(timeout_ms) + " ms)").c_str());
                throw nb::python_error();
            }
            close(fd);
            for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
                ggml_backend_dev_t dev = ggml_backend_dev_get(i);
                if (ggml_backend_dev_description(dev) != endpoint) continue;
                without_gil([&] { size_t free = 0, total = 0; ggml_backend_dev_memory(dev, &free, &total); });
                if (rpc_endpoint_lost(endpoint)) lost("went away");
                break;
            }
        } else {
            const std::string why = without_gil([&] { return rpc_handshake(endpoint, timeout_ms); });
            if (!why.empty()) {
                PyErr_SetString(PyExc_ConnectionError, ("RPC server " + endpoint + ": " + why).c_str());
                throw nb::python_error();
            }
            if (g_rpc_failures.load() == nullptr) {  // absent when llama.cpp is a user tree without the patch
                g_rpc_failures.store(reinterpret_cast<rpc_failures_fn>(
                    ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_failures")));
            }
            ggml_backend_reg_t reg = without_gil([&] { return add(endpoint.c_str()); });  // connects to the server
            if (rpc_endpoint_lost(endpoint)) lost("went away as ggml connected");
            if (reg == nullptr) {
                PyErr_SetString(PyExc_ConnectionError, ("RPC server " + endpoint + " offers no device").c_str());
                throw nb::python_error();
            }
            ggml_backend_register(reg);
            added.push_back(endpoint);
        }
        std::vector<size_t> idx;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            if (ggml_backend_dev_description(ggml_backend_dev_get(i)) == endpoint) idx.push_back(i);
        }
        return idx;
    }, nb::arg("endpoint"), nb::arg("timeout_ms") = 3000,
    "Connect an RPC server (host:port) and register its devices; returns their indices. ConnectionError\n"
    "(naming the endpoint) when nothing answers within timeout_ms or it speaks another protocol version.");

    m.def("supports_row_split", [](size_t index) {
        if (index >= ggml_backend_dev_count()) throw std::out_of_range("no device " + std::to_string(index));
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(ggml_backend_dev_get(index));
        return reg != nullptr && ggml_backend_reg_get_proc_address(reg, "ggml_backend_split_buffer_type") != nullptr;
    }, nb::arg("index"), "Whether the device's backend offers split buffers (split_mode='row').");
    m.def("devices", [](bool memory) {
        nb::list out;
        size_t n = ggml_backend_dev_count();
        for (size_t i = 0; i < n; ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            nb::dict d;
            d["index"] = i;
            d["name"] = ggml_backend_dev_name(dev);
            d["description"] = ggml_backend_dev_description(dev);
            d["backend"] = ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev));
            d["type"] = dev_type_name(ggml_backend_dev_type(dev));
            d["memory_free"] = nb::none();
            d["memory_total"] = nb::none();
            // asking a lost server opens a new connection, and ggml aborts when that fails
            if (memory && !rpc_endpoint_lost(ggml_backend_dev_description(dev))) {
                size_t free = 0, total = 0;
                // opens the device (a CUDA context) or asks a server
                without_gil([&] { ggml_backend_dev_memory(dev, &free, &total); });
                if (!rpc_endpoint_lost(ggml_backend_dev_description(dev))) {  // a lost server answers zeros
                    d["memory_free"] = free;
                    d["memory_total"] = total;
                }
            }
            out.append(d);
        }
        return out;
    }, nb::arg("memory") = true,
       "Every device of every loaded backend, in ggml's order: index, name, description, "
       "backend, type (cpu/gpu/igpu/accel), memory_free, memory_total (bytes; None unless memory=True: "
       "asking opens the device, which creates a CUDA context of several hundred MiB).");
    m.def("device_memory", [](size_t index) {
        if (index >= ggml_backend_dev_count()) throw std::out_of_range("no device " + std::to_string(index));
        size_t free = 0, total = 0;
        without_gil([&] { ggml_backend_dev_memory(ggml_backend_dev_get(index), &free, &total); });
        return std::make_pair(free, total);
    }, nb::arg("index"), "(free, total) bytes of one device; opens it (a CUDA context on a CUDA device).");
}

}  // namespace lamina
