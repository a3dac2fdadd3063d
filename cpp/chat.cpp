// Chat: messages rendered by llama.cpp's own chat support (common/chat.h): the model's Jinja
// template (or one given) run by llama.cpp's sandboxed Jinja engine, never Python, with tools and
// thinking as llama-server passes them; built-in template names by llama_chat_apply_template.
#include "lamina.h"

#include "chat.h"

#include <nanobind/stl/map.h>

namespace lamina {

namespace {

// One model's templates (its own, or one given), parsed once.
class chat_templates {
public:
    // The model is read here only (its template, BOS and EOS): the templates keep no reference to it.
    chat_templates(nb::handle model, const std::string & tmpl, bool jinja) : jinja_(jinja) {
        const std::shared_ptr<model_state> m = model_shared(model);
        gil_release nogil;  // parsing and the thinking probe run the template: other threads go on
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

    // The prompt and what generation needs for a request in OpenAI's chat shape (messages, tools,
    // tool_choice, parallel_tool_calls, add_generation_prompt, chat_template_kwargs,
    // reasoning_format), made the way llama-server's /apply-template and /v1/chat/completions
    // make it (server-common.cpp, oaicompat_chat_params_parse: a trailing assistant message is
    // continued; thinking is on where the template supports it, unless enable_thinking says no).
    nb::dict render(nb::handle model, const std::string & request) const {
        model_shared(model);  // a closed model raises ClosedError, as its other methods do
        common_chat_templates_inputs in;
        common_chat_params out;
        {
            gil_release nogil;  // a long template, many messages: nothing here touches Python
            const common_json body = parse(request);
                const common_json tools = body.value("tools", common_json());
            std::string choice;
            named("tool_choice", [&] { choice = body.value("tool_choice", std::string("auto")); });
            if (!jinja_ && ((tools.is_array() && !tools.empty()) || choice != "auto")) {
                throw std::invalid_argument("tools need a Jinja template (this is a built-in template name)");
            }
            out = apply(body, tools, choice, in);
        }
        return result(in, out);
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
        named("the chat template did not render", [&] { out = common_chat_templates_apply(t_.get(), in); });
        return out;
    }

    static nb::dict result(const common_chat_templates_inputs & in, const common_chat_params & out) {
        nb::dict d;
        d["prompt"] = nb::bytes(out.prompt.data(), out.prompt.size());
        d["format"] = common_chat_format_name(out.format);
        d["grammar"] = out.grammar;
        d["grammar_lazy"] = out.grammar_lazy;
        nb::list triggers;
        for (const common_grammar_trigger & t : out.grammar_triggers) triggers.append(nb::make_tuple(int(t.type), t.value, t.token));
        d["grammar_triggers"] = triggers;
        d["preserved_tokens"] = out.preserved_tokens;
        d["additional_stops"] = out.additional_stops;
        d["generation_prompt"] = out.generation_prompt;
        d["thinking"] = in.enable_thinking;
        d["thinking_start_tag"] = out.thinking_start_tag;
        d["thinking_end_tags"] = out.thinking_end_tags;
        d["parser"] = out.parser;
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

    // f(), its exceptions as ValueError naming the part: "what: why".
    template <class F>
    static void named(const char * what, F && f) {
        try {
            f();
        } catch (const std::exception & e) {
            throw std::invalid_argument(std::string(what) + ": " + e.what());
        }
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

    m.def("chat_builtin_templates", []() {
        int32_t n = llama_chat_builtin_templates(nullptr, 0);
        std::vector<const char *> names(size_t(std::max(n, 0)));
        llama_chat_builtin_templates(names.data(), names.size());
        std::vector<std::string> out(names.begin(), names.end());
        return out;
    }, "Names of the chat templates llama.cpp has built in.");
}

}  // namespace lamina
