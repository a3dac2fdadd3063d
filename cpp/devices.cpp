// Devices exposed by the loaded ggml backends.
#include "lamina.h"

#include "ggml-backend.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace lamina {
namespace {

// ggml's RPC client aborts the process when it cannot connect. Before the first connection to a
// server, probe "host:port" with a non-blocking connect (timeout_ms) and raise instead. (Not a
// liveness check for later: the server serves one client at a time, so probes then queue.)
bool endpoint_reachable(const std::string & endpoint, int timeout_ms) {
    size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos) return false;
    std::string host = endpoint.substr(0, colon), port = endpoint.substr(colon + 1);
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * res = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) return false;
    bool ok = false;
    for (addrinfo * a = res; a != nullptr && !ok; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) continue;
        int rc = connect(fd, a->ai_addr, a->ai_addrlen);
        if (rc == 0) {
            ok = true;
        } else if (errno == EINPROGRESS) {
            pollfd p{fd, POLLOUT, 0};
            if (poll(&p, 1, timeout_ms) == 1) {
                int err = 0;
                socklen_t len = sizeof(err);
                ok = getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
            }
        }
        close(fd);
    }
    freeaddrinfo(res);
    return ok;
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

}  // namespace

ggml_backend_dev_t device_named(const std::string & name) {
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const std::string dn = ggml_backend_dev_name(dev);
        if (name == dn || name.rfind(dn + "[", 0) == 0 || name.rfind(dn + "_", 0) == 0) return dev;
    }
    return nullptr;
}

void init_devices(nb::module_ & m) {
    m.def("rpc_add_server", [](const std::string & endpoint) {
        static std::vector<std::string> added;  // ggml returns the same registry again: register once
        ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
        if (rpc == nullptr) {
            throw lamina_error("this build has no RPC backend: rebuild with -Ccmake.define.GGML_RPC=ON");
        }
        auto add = reinterpret_cast<ggml_backend_reg_t (*)(const char *)>(
            ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server"));
        if (add == nullptr) throw lamina_error("the RPC backend has no ggml_backend_rpc_add_server");
        if (std::find(added.begin(), added.end(), endpoint) == added.end()) {
            bool up;
            {
                nb::gil_scoped_release nogil;
                up = endpoint_reachable(endpoint, 3000);
            }
            if (!up) {
                PyErr_SetString(PyExc_ConnectionError, ("no RPC server answered at " + endpoint).c_str());
                throw nb::python_error();
            }
            ggml_backend_reg_t reg;
            {
                nb::gil_scoped_release nogil;  // connects to the server
                reg = add(endpoint.c_str());
            }
            if (reg == nullptr) {
                PyErr_SetString(PyExc_ConnectionError, ("no RPC server answered at " + endpoint).c_str());
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
    }, nb::arg("endpoint"), "Connect an RPC server (host:port) and register its devices; returns their indices.");

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
            if (memory) {
                size_t free = 0, total = 0;
                {
                    nb::gil_scoped_release nogil;  // opens the device (a CUDA context) or asks a server
                    ggml_backend_dev_memory(dev, &free, &total);
                }
                d["memory_free"] = free;
                d["memory_total"] = total;
            } else {
                d["memory_free"] = nb::none();
                d["memory_total"] = nb::none();
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
        {
            nb::gil_scoped_release nogil;
            ggml_backend_dev_memory(ggml_backend_dev_get(index), &free, &total);
        }
        return std::make_pair(free, total);
    }, nb::arg("index"), "(free, total) bytes of one device; opens it (a CUDA context on a CUDA device).");
}

}  // namespace lamina
