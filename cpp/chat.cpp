// Chat: messages rendered by llama.cpp's own chat support (common/chat.h): the model's Jinja
// template (or one given) run by llama.cpp's sandboxed Jinja engine, never Python, with tools and
// thinking as llama-server passes them; built-in template names by llama_chat_apply_template.
#include "lamina.h"

#include "chat.h"
#include "jinja/value.h"

#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>

#include <mutex>
#include <random>
#include <set>

namespace lamina {

namespace {

// f(), its exceptions as ValueError naming the part: "what: why".
template <class F>
void named(const char * what, F && f) {
    try {
        f();
    } catch (const std::exception & e) {
        throw std::invalid_argument(std::string(what) + ": " + e.what());
    }
}

// The bounds of lamina's patch 0005 on llama.cpp's Jinja runtime (depth, steps, sizes): one budget
// for everything one call renders, and Ctrl-C in the main thread stops a render (made and
// destroyed with the GIL held; the render itself runs without it). Nothing on a tree built without
// the patch.
class render_budget {
public:
    render_budget() : watch_(on_main_thread()) {
#ifdef JINJA_BUDGET
        if (watch_.active()) jinja::budget::interrupted() = &signal_arrived;
#endif
    }
    ~render_budget() {
#ifdef JINJA_BUDGET
        jinja::budget::interrupted() = nullptr;
#endif
    }
    render_budget(const render_budget &) = delete;
    render_budget & operator=(const render_budget &) = delete;

    // f() without the GIL; a render a signal stopped runs Python's handlers (KeyboardInterrupt).
    template <class F>
    void run(F && f) {
        try {
            gil_release nogil;
            f();
        } catch (const std::invalid_argument &) {
            if (PyErr_CheckSignals() != 0) throw nb::python_error();
            throw;
        }
    }

private:
    signal_watch watch_;
#ifdef JINJA_BUDGET
    jinja::budget_session session_;
#endif
};

// How a reply to one render is parsed: the template's format and its parser, loaded once. Made by
// render only (the parser's text never passes through Python: a hand-made one could recurse forever).
struct reply_format {
    common_chat_parser_params params;
};

// One model's templates (its own, or one given), parsed once.
class chat_templates {
public:
    // The model is read here only (its template, BOS and EOS): the templates keep no reference to it.
    chat_templates(nb::handle model, const std::string & tmpl, bool jinja) : jinja_(jinja) {
        const std::shared_ptr<model_state> m = model_shared(model);
        render_budget budget;  // all the renders of the template's analysis share one
        budget.run([&] { init(m, tmpl); });  // parsing and the probes run the template: other threads go on
    }

private:
    void init(const std::shared_ptr<model_state> & m, const std::string & tmpl) {
        std::string src = tmpl;
        if (src.empty() && m->vocab_only) src = file_chat_template(m->path).value_or("");  // not kept by that load
        if (jinja_) {
            const char * own = llama_model_chat_template(m->model.get(), nullptr);
            const char * tool_use = llama_model_chat_template(m->model.get(), "tool_use");
            for (const std::string & t : {src.empty() && own ? std::string(own) : src, tool_use && src.empty() ? std::string(tool_use) : std::string()}) {
                if (t.empty()) continue;
                check_nesting(t);
                try {  // parsed once more here for the error: common_chat_templates_init rethrows it sliced
                    const common_chat_template probe(t, "", "");
                    (void)probe;
                } catch (const std::exception & e) {
                    throw std::invalid_argument(std::string("the chat template does not parse: ") + e.what());
                }
            }
        }
        named("the chat template does not parse", [&] { t_ = common_chat_templates_init(m->model.get(), src); });
        // as llama-server at its start: thinking is on by default where the template supports it
        named("the chat template did not render", [&] {
            thinking_ = jinja_ && common_chat_templates_support_enable_thinking(t_.get());
        });
    }

public:
    // The prompt and what generation needs for a request in OpenAI's chat shape (messages, tools,
    // tool_choice, parallel_tool_calls, add_generation_prompt, chat_template_kwargs,
    // reasoning_format), made the way llama-server's /apply-template and /v1/chat/completions
    // make it (server-common.cpp, oaicompat_chat_params_parse: a trailing assistant message is
    // continued; thinking is on where the template supports it, unless enable_thinking says no).
    nb::dict render(nb::handle model, const std::string & request) const {
        model_shared(model);  // a closed model raises ClosedError, as its other methods do
        common_chat_templates_inputs in;
        common_chat_params out;
        render_budget budget;
        budget.run([&] {  // a long template, many messages: nothing here touches Python
            const common_json body = parse(request);
            const common_json tools = body.value("tools", common_json());
            // llama.cpp turns tool parameters and a json_schema into a grammar by recursing once per
            // level: bound them as json_schema_to_grammar is bounded (sampler.cpp)
            for (const char * key : {"tools", "json_schema"}) {
                if (body.contains(key) && too_deep(body.at(key), 64)) {
                    throw std::invalid_argument(std::string(key) + ": nests more than 64 levels deep");
                }
            }
            check_messages(body);
            std::string choice;
            named("tool_choice", [&] { choice = body.value("tool_choice", std::string("auto")); });
            if (!jinja_ && ((tools.is_array() && !tools.empty()) || choice != "auto")) {
                throw std::invalid_argument("tools need a Jinja template (this is a built-in template name)");
            }
            out = apply(body, tools, choice, in);
        });
        return result(in, out, model_shared(model)->vocab);
    }

    std::map<std::string, bool> caps() const { return common_chat_templates_get_caps(t_.get()); }
    std::string source() const { return common_chat_templates_source(t_.get()); }

private:
    common_chat_params apply(const common_json & body, const common_json & tools, const std::string & choice,
                             common_chat_templates_inputs & in) const {
        auto caps = common_chat_templates_get_caps(t_.get());
        named("messages", [&] { in.messages = common_chat_msgs_parse_oaicompat(body.at("messages")); });
        named("tools", [&] { in.tools = common_chat_tools_parse_oaicompat(tools); });
        named("tool_choice", [&] { in.tool_choice = common_chat_tool_choice_parse_oaicompat(choice); });
        in.use_jinja = jinja_;
        in.parallel_tool_calls = body.value("parallel_tool_calls", caps["supports_parallel_tool_calls"]);
        in.add_generation_prompt = body.value("add_generation_prompt", true);
        if (!in.messages.empty() && in.messages.back().role == "assistant") {  // llama-server's prefill_assistant
            if (in.messages.size() >= 2 && in.messages[in.messages.size() - 2].role == "assistant") {
                throw std::invalid_argument("two assistant messages at the end: only the last one can be continued");
            }
            if (!in.messages.back().tool_calls.empty()) {
                throw std::invalid_argument("a last assistant message with tool_calls cannot be continued");
            }
            in.continue_final_message = COMMON_CHAT_CONTINUATION_AUTO;
            in.add_generation_prompt = false;
        }
        named("reasoning_format", [&] {
            in.reasoning_format = common_reasoning_format_from_name(body.value("reasoning_format", std::string("deepseek")));
        });
        const common_json kwargs = body.value("chat_template_kwargs", common_json::object());
        for (const auto & [k, v] : kwargs.items()) in.chat_template_kwargs[k] = v.dump();
        common_chat_params out;
        in.enable_thinking = thinking_;
        named("enable_thinking", [&] {
            if (body.contains("enable_thinking")) in.enable_thinking = body.at("enable_thinking").get<bool>();
            const auto it = in.chat_template_kwargs.find("enable_thinking");  // as llama-server reads the kwarg
            if (it == in.chat_template_kwargs.end() || it->second.empty()) return;
            if (it->second == "true" || it->second == "false") in.enable_thinking = it->second == "true";
            else if (it->second[0] == '"') throw std::invalid_argument("a boolean, not a string, in chat_template_kwargs");
        });
        named("json_schema", [&] {
            const common_json schema = body.value("json_schema", common_json());
            if (!schema.is_null()) in.json_schema = schema.dump();
        });
        named("grammar", [&] { in.grammar = body.value("grammar", std::string()); });
        if (!in.grammar.empty() && !in.json_schema.empty()) throw std::invalid_argument("give a grammar or a json_schema, not both");
        if (!in.grammar.empty() && !in.tools.empty() && in.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE) {
            throw std::invalid_argument("a grammar of your own cannot go with tools (the tools' grammar is the template's)");
        }
        named("the chat template did not render", [&] { out = common_chat_templates_apply(t_.get(), in); });
        return out;
    }

    // As llama-server hands a render to its sampler (server-schema.cpp): a trigger word that is one
    // token is a token trigger (and must be a preserved token), other words an escaped pattern, a
    // full pattern anchored; preserved tokens are those that are one token.
    static nb::dict result(const common_chat_templates_inputs & in, const common_chat_params & out, const llama_vocab * vocab) {
        nb::dict d;
        d["prompt"] = nb::bytes(out.prompt.data(), out.prompt.size());
        d["format"] = common_chat_format_name(out.format);
        d["grammar"] = out.grammar;
        d["grammar_lazy"] = out.grammar_lazy;
        std::vector<int32_t> preserved;
        std::vector<std::string> patterns;
        std::vector<int32_t> trigger_tokens;
        for (const std::string & t : out.preserved_tokens) {
            const std::vector<llama_token> ids = common_tokenize(vocab, t, false, true);
            if (ids.size() == 1) preserved.push_back(ids[0]);
        }
        for (const common_grammar_trigger & t : out.grammar_triggers) {
            switch (t.type) {
                case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: {
                    const std::vector<llama_token> ids = common_tokenize(vocab, t.value, false, true);
                    if (ids.size() == 1) {
                        if (std::find(preserved.begin(), preserved.end(), ids[0]) == preserved.end()) {
                            throw std::invalid_argument("the template's grammar trigger word is not a preserved token: " + t.value);
                        }
                        trigger_tokens.push_back(ids[0]);
                    } else {
                        patterns.push_back(regex_escape(t.value));
                    }
                    break;
                }
                case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN: patterns.push_back(t.value); break;
                case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
                    const std::string & p = t.value;
                    patterns.push_back(p.empty() ? "^$" : (p.front() != '^' ? "^" : "") + p + (p.back() != '$' ? "$" : ""));
                    break;
                }
                case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN: trigger_tokens.push_back(t.token); break;
            }
        }
        if (out.grammar_lazy && !out.grammar.empty() && patterns.empty() && trigger_tokens.empty()) {
            throw std::invalid_argument("the template's lazy grammar has no trigger");
        }
        d["grammar_trigger_patterns"] = patterns;
        d["grammar_trigger_tokens"] = trigger_tokens;
        d["preserved_tokens"] = out.preserved_tokens;
        d["preserved_token_ids"] = preserved;
        d["additional_stops"] = out.additional_stops;
        d["generation_prompt"] = out.generation_prompt;
        d["thinking"] = in.enable_thinking;
        d["thinking_start_tag"] = out.thinking_start_tag;
        d["thinking_end_tags"] = out.thinking_end_tags;
        d["parser"] = out.parser;
        reply_format f;
        f.params.format = out.format;
        f.params.reasoning_format = in.reasoning_format;
        f.params.generation_prompt = out.generation_prompt;
        f.params.is_continuation = in.continue_final_message != COMMON_CHAT_CONTINUATION_NONE;
        f.params.parse_tool_calls = !in.tools.empty() && in.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE;
        if (!out.parser.empty()) named("the chat parser does not load", [&] { f.params.parser.load(out.parser); });
        d["reply"] = nb::cast(std::move(f));
        return d;
    }

    // llama.cpp's Jinja parser recurses once per level of brackets and block tags: a template
    // nested thousands deep (a hostile GGUF) overflowed the stack. Real templates nest a few levels.
    static void check_nesting(const std::string & t) {
        constexpr int limit = 256;
        int brackets = 0, blocks = 0;
        for (size_t i = 0; i < t.size(); ++i) {
            const char c = t[i];
            if (c == '(' || c == '[' || c == '{') ++brackets;
            if (c == ')' || c == ']' || c == '}') brackets = std::max(0, brackets - 1);
            if (c == '{' && i + 1 < t.size() && t[i + 1] == '%') {
                size_t j = i + 2;
                while (j < t.size() && (t[j] == '-' || t[j] == '+' || t[j] == ' ' || t[j] == '\t' || t[j] == '\n')) ++j;
                if (t.compare(j, 3, "end") == 0) blocks = std::max(0, blocks - 1);
                else if (t.compare(j, 2, "if") == 0 || t.compare(j, 3, "for") == 0 || t.compare(j, 5, "macro") == 0 ||
                         t.compare(j, 4, "call") == 0 || t.compare(j, 6, "filter") == 0) {
                    ++blocks;
                }
            }
            if (brackets > limit || blocks > limit) {
                throw std::invalid_argument("the chat template does not parse: it nests deeper than " + std::to_string(limit) +
                                            " levels");
            }
        }
    }

    // Messages the template will walk, and tool-call arguments llama.cpp parses into objects: both
    // recursed once per level (arguments 100,000 levels deep overflowed the stack).
    static void check_messages(const common_json & body) {
        if (!body.contains("messages")) return;
        const common_json & messages = body.at("messages");
        if (too_deep(messages, 128)) throw std::invalid_argument("messages: nest more than 128 levels deep");
        if (!messages.is_array()) return;
        for (size_t i = 0; i < messages.size(); ++i) {
            const common_json & m = messages.at(i);
            if (!m.is_object() || !m.contains("tool_calls") || !m.at("tool_calls").is_array()) continue;
            for (const auto & call : m.at("tool_calls")) {
                if (!call.is_object() || !call.contains("function") || !call.at("function").is_object()) continue;
                const common_json & fn = call.at("function");
                if (fn.contains("arguments") && fn.at("arguments").is_string() &&
                    bracket_depth().feed(fn.at("arguments").get<std::string>()) > 128) {
                    throw std::invalid_argument("message " + std::to_string(i) + ": tool call arguments nest more than 128 levels deep");
                }
            }
        }
    }

    static bool too_deep(const common_json & j, int room) {
        if (!j.is_object() && !j.is_array()) return false;
        if (room == 0) return true;
        for (const auto & v : j) {
            if (too_deep(v, room - 1)) return true;
        }
        return false;
    }

    static common_json parse(const std::string & text) {
        try {
            return common_json::parse(text);
        } catch (const std::exception & e) {
            throw std::invalid_argument(std::string("the chat request is not JSON: ") + e.what());
        }
    }

    common_chat_templates_ptr t_;
    bool jinja_;
    bool thinking_ = false;  // the template supports enable_thinking
};


// A reply being parsed into content, reasoning and tool calls by the template's parser
// (common_chat_parse), as llama-server's task_result_state: the text so far is parsed again at each
// piece, and what changed comes out as deltas, each tool call's id and name once (with its first
// argument fragment, or at the end), then argument fragments.
class chat_parser {
public:
    explicit chat_parser(const reply_format & f) : p_(f.params) {
        if (p_.is_continuation) msg_ = parse("", true);  // no delta for the continued message's start
    }

    // Add generated text; the deltas it makes, each ("content" | "reasoning", text) or
    // ("tool", index, id, name, arguments fragment). final: the whole reply is in (it must parse).
    nb::list update(const std::string & added, bool final) {
        std::vector<common_chat_msg_diff> diffs;
        {
            const std::unique_lock<std::mutex> lk = hold();
            gil_release nogil;
            text_ += added;
            nesting(added);
            common_chat_msg m = parse(text_, !final);
            if (!m.empty() || final) {
                m.set_tool_call_ids(ids_, [] { return new_id(); });
                std::vector<common_chat_msg_diff> all;
                named("the reply's tool calls changed as it went on", [&] { all = common_chat_msg_diff::compute_diffs(msg_, m); });
                msg_ = std::move(m);
                for (common_chat_msg_diff & d : all) filter(d, final, diffs);
                if (final) flush_names(std::string::npos, diffs);
            }
        }
        nb::list out;
        for (const common_chat_msg_diff & d : diffs) {
            if (!d.reasoning_content_delta.empty()) out.append(nb::make_tuple("reasoning", d.reasoning_content_delta));
            if (!d.content_delta.empty()) out.append(nb::make_tuple("content", d.content_delta));
            if (d.tool_call_index != std::string::npos) {
                out.append(nb::make_tuple("tool", d.tool_call_index, d.tool_call_delta.id, d.tool_call_delta.name,
                                          d.tool_call_delta.arguments));
            }
        }
        return out;
    }

    // The message so far: (content, reasoning_content, [(id, name, arguments), ...]).
    nb::tuple message() const {
        const std::unique_lock<std::mutex> lk = hold();
        nb::list calls;
        for (const common_chat_tool_call & c : msg_.tool_calls) calls.append(nb::make_tuple(c.id, c.name, c.arguments));
        return nb::make_tuple(msg_.content, msg_.reasoning_content, calls);
    }

    nb::bytes text() const {
        const std::unique_lock<std::mutex> lk = hold();
        return nb::bytes(text_.data(), text_.size());
    }

private:
    // One thread at a time (update parses without the GIL): another one gets BusyError, never a wait.
    std::unique_lock<std::mutex> hold() const {
        std::unique_lock<std::mutex> lk(mu_, std::try_to_lock);
        if (!lk.owns_lock()) throw busy_error("the chat parser is in use by another thread");
        return lk;
    }

    // llama.cpp's parser recurses once per level of brackets: a reply nested thousands deep (a
    // model's arguments can nest anything) overflowed the stack. Counted outside JSON strings.
    void nesting(const std::string & added) {
        constexpr int limit = 256;
        if (depth_.feed(added) > limit) {
            throw std::invalid_argument("the reply nests deeper than " + std::to_string(limit) + " levels of brackets: not parsed");
        }
    }

    common_chat_msg parse(const std::string & text, bool partial) const {
        try {
            return common_chat_parse(text, partial, p_);
        } catch (const std::exception & e) {
            throw std::invalid_argument(std::string("the reply does not parse: ") + e.what());
        }
    }

    static std::string new_id() {
        static const char chars[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        thread_local std::mt19937 gen{std::random_device{}()};
        std::string id = "call_";
        for (int i = 0; i < 24; ++i) id += chars[gen() % (sizeof(chars) - 1)];
        return id;
    }

    // A call's name can still grow while its text comes in: send it once, when its arguments begin
    // or another kind of delta follows (server-task.cpp's filter_tool_calls).
    void flush_names(size_t except, std::vector<common_chat_msg_diff> & diffs) {
        for (size_t i = 0; i < msg_.tool_calls.size(); ++i) {
            if (i == except || named_.count(i) || msg_.tool_calls[i].name.empty()) continue;
            common_chat_msg_diff h;
            h.tool_call_index = i;
            h.tool_call_delta.id = msg_.tool_calls[i].id;
            h.tool_call_delta.name = msg_.tool_calls[i].name;
            diffs.push_back(std::move(h));
            named_.insert(i);
        }
    }

    void filter(common_chat_msg_diff & d, bool final, std::vector<common_chat_msg_diff> & diffs) {
        const size_t i = d.tool_call_index;
        flush_names(i != std::string::npos && d.tool_call_delta.arguments.empty() ? i : std::string::npos, diffs);
        if (i == std::string::npos) {
            diffs.push_back(std::move(d));
        } else if (named_.count(i)) {
            if (!d.tool_call_delta.arguments.empty()) {
                d.tool_call_delta.name.clear();
                d.tool_call_delta.id.clear();
                diffs.push_back(std::move(d));
            }
        } else if (!d.tool_call_delta.arguments.empty() || final) {
            d.tool_call_delta.name = msg_.tool_calls[i].name;
            d.tool_call_delta.id = msg_.tool_calls[i].id;
            diffs.push_back(std::move(d));
            named_.insert(i);
        }
    }

    mutable std::mutex mu_;
    common_chat_parser_params p_;
    std::string text_;
    bracket_depth depth_;
    common_chat_msg msg_;
    std::vector<std::string> ids_;
    std::set<size_t> named_;
};

}  // namespace

void init_chat(nb::module_ & m) {
    nb::class_<chat_templates>(m, "ChatTemplates", "A model's chat templates, parsed once (common/chat.h).")
        .def(nb::init<nb::handle, const std::string &, bool>(), nb::arg("model"), nb::arg("template") = "",
             nb::arg("jinja") = true,
             "template: Jinja source ('': the model's own), or with jinja=False a built-in name ('chatml', ...).")
        .def("render", &chat_templates::render, nb::arg("model"), nb::arg("request"),
             "The prompt (bytes) and chat format, grammar, triggers, stops and parser for a request in OpenAI's chat "
             "shape (JSON text), as llama-server makes them.")
        .def_prop_ro("caps", &chat_templates::caps, "What the template supports (tools, system role, thinking, ...).")
        .def_prop_ro("source", &chat_templates::source, "The template's Jinja source.");

    nb::class_<reply_format>(m, "ReplyFormat", "How a reply to one ChatTemplates.render is parsed (its 'reply').")
        .def("parser", [](const reply_format & f) { return new chat_parser(f); }, "A fresh ChatParser for one reply.");

    nb::class_<chat_parser>(m, "ChatParser", "A reply parsed into content, reasoning and tool calls (common_chat_parse).")
        .def("update", &chat_parser::update, nb::arg("added"), nb::arg("final"),
             "Add generated text; the deltas: ('content'|'reasoning', text) or ('tool', index, id, name, arguments).")
        .def_prop_ro("message", &chat_parser::message, "(content, reasoning_content, [(id, name, arguments)]) so far.")
        .def_prop_ro("text", &chat_parser::text, "The generated text so far (bytes).");

    m.def("template_max_steps", [](std::optional<int64_t> n) -> int64_t {
#ifdef JINJA_BUDGET
        if (n) {
            if (*n < 1000) throw std::invalid_argument("max_steps must be >= 1000");
            jinja::budget::max_steps().store(*n);
        }
        return jinja::budget::max_steps().load();
#else
        (void)n;
        return -1;
#endif
    }, nb::arg("n") = nb::none(), "Steps one chat template render may take (set with n); -1: unbounded (unpatched llama.cpp).");

    m.def("chat_builtin_templates", []() {
        int32_t n = llama_chat_builtin_templates(nullptr, 0);
        std::vector<const char *> names(size_t(std::max(n, 0)));
        llama_chat_builtin_templates(names.data(), names.size());
        std::vector<std::string> out(names.begin(), names.end());
        return out;
    }, "Names of the chat templates llama.cpp has built in.");
}

}  // namespace lamina
