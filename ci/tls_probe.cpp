// A shared library with a thread_local block of SIZE bytes aligned to ALIGN, whose static
// initializer touches it while the library loads: the shape of libllama-common.so's TLS in the
// CUDA build (issue: import lamina after numpy segfaulted in libllama-common's init).
//   g++ -O2 -shared -fPIC -DSIZE=67096 -DALIGN=64 ci/tls_probe.cpp -o libtls_probe.so
//   python -c "import numpy, ctypes; ctypes.CDLL('./libtls_probe.so'); print('ok')"
#include <cstddef>
struct alignas(ALIGN) block { char bytes[SIZE]; block() { bytes[0] = 1; bytes[SIZE - 1] = 2; } };
thread_local block tls_block;
static int touched = tls_block.bytes[0] + tls_block.bytes[SIZE - 1];
extern "C" int tls_probe_value() { return touched; }
