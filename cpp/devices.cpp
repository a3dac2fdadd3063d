// Devices exposed by the loaded ggml backends.
#include "lamina.h"

#include "ggml-backend.h"

namespace lamina {
namespace {

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

}  // namespace

void init_devices(nb::module_ & m) {
    m.def("devices", []() {
        nb::list out;
        size_t n = ggml_backend_dev_count();
        for (size_t i = 0; i < n; ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            size_t free = 0, total = 0;
            {
                nb::gil_scoped_release nogil;  // may query a driver or a remote server
                ggml_backend_dev_memory(dev, &free, &total);
            }
            nb::dict d;
            d["index"] = i;
            d["name"] = ggml_backend_dev_name(dev);
            d["description"] = ggml_backend_dev_description(dev);
            d["backend"] = ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev));
            d["type"] = dev_type_name(ggml_backend_dev_type(dev));
            d["memory_free"] = free;
            d["memory_total"] = total;
            out.append(d);
        }
        return out;
    }, "Every device of every loaded backend, in ggml's order: index, name, description, "
       "backend, type (cpu/gpu/igpu/accel), memory_free, memory_total (bytes).");
}

}  // namespace lamina
