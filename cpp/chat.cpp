// Chat: render messages with llama.cpp's own template support (no template engine in Python).
#include "lamina.h"

#include <nanobind/stl/pair.h>

namespace lamina {

void init_chat(nb::module_ & m) {
    m.def("chat_apply_template", [](const std::string & tmpl, const std::vector<std::pair<std::string, std::string>> & msgs,
                                    bool add_assistant) {
        std::vector<llama_chat_message> chat;
        chat.reserve(msgs.size());
        size_t total = 0;
        for (const auto & [role, content] : msgs) {
            chat.push_back({role.c_str(), content.c_str()});
            total += role.size() + content.size();
        }
        std::string buf(total * 2 + 256, '\0');
        int32_t n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, buf.data(),
                                              int32_t(buf.size()));
        if (n < 0) {
            throw std::invalid_argument("llama.cpp does not support this chat template (it recognises the built-in "
                                        "templates listed by lamina.chat_templates())");
        }
        if (size_t(n) > buf.size()) {
            buf.resize(size_t(n));
            n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, buf.data(),
                                          int32_t(buf.size()));
        }
        buf.resize(size_t(n));
        return nb::bytes(buf.data(), buf.size());
    }, nb::arg("template"), nb::arg("messages"), nb::arg("add_assistant") = true,
    "Render (role, content) messages with a template string from a model or a built-in name ('gemma', 'chatml', ...).");

    m.def("chat_builtin_templates", []() {
        int32_t n = llama_chat_builtin_templates(nullptr, 0);
        std::vector<const char *> names(size_t(std::max(n, 0)));
        llama_chat_builtin_templates(names.data(), names.size());
        std::vector<std::string> out(names.begin(), names.end());
        return out;
    }, "Names of the chat templates llama.cpp has built in.");
}

}  // namespace lamina
