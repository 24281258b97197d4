// mcmoe-gguf: where ggml looks for its dynamically loaded backends (GGML_BACKEND_DL builds).
//
// The runtime is built like llama.cpp's release binaries: one CPU backend per instruction-set level
// (libggml-cpu-x64.so ... libggml-cpu-sapphirerapids.so, GGML_CPU_ALL_VARIANTS), of which ggml loads
// the best one the CPU can run. ggml searches the executable's directory and the current directory.
// Our main users are Python processes (llama-cpp-python), whose executable is python3: the modules sit
// beside libggml.so in llama_cpp/lib (or in .dev/build/bin for a development build), so that
// directory is searched first. Found with dladdr on a function of libggml itself.
#pragma once

#include <filesystem>

#if defined(__linux__) || defined(__APPLE__) || defined(__FreeBSD__)
#include <dlfcn.h>

static inline std::filesystem::path mcmoe_backend_dir(void) {
    Dl_info info;
    if (dladdr((const void *) &mcmoe_backend_dir, &info) && info.dli_fname) {
        return std::filesystem::path(info.dli_fname).parent_path();
    }
    return {};
}
#else
static inline std::filesystem::path mcmoe_backend_dir(void) {
    return {};
}
#endif
