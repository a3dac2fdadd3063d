// lamina._native: one module, one init function per concern (see lamina.h).
#include "lamina.h"

NB_MODULE(_native, m) {
    m.doc() = "lamina's native core over llama.cpp. Private: use the `lamina` package.";
    lamina::init_errors(m);
    lamina::init_logging(m);
    lamina::init_system(m);
    lamina::init_devices(m);
    lamina::init_model(m);
    lamina::init_context(m);
    lamina::init_sampler(m);
    lamina::init_generate(m);
    lamina::init_chat(m);
    lamina::init_memory(m);
    lamina::init_fit(m);
    lamina::init_batcher(m);
    lamina::init_bandwidth(m);
    lamina::init_lora(m);
    lamina::init_exit(m);
}
