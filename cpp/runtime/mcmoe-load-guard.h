// mcmoe-gguf: a damaged model file ends in an error, not in abort().
//
// llama.cpp checks much of what it reads with GGML_ASSERT (for instance the vocabulary loader asserts
// that no two tokens are equal, which one flipped bit in a token string breaks), and a failed
// GGML_ASSERT calls abort(): the process dies with SIGABRT, and with it a Python program or server that
// only wanted to report "this file is damaged". While this guard lives (it is put at the top of
// llama_model_load, around reading the file), ggml's abort callback throws instead; llama_model_load
// already catches std::exception and turns it into its "error loading model: ..." result, with ggml's
// message (file:line: condition) as the reason, which mcmoe_gguf.load carries into its ValueError.
// The throw unwinds through ggml_abort, a C function: x86-64 and AArch64 Linux builds carry unwind
// tables for C code by default, and ggml_abort holds no resource. Outside the guard (and on other
// threads while it lives) an assertion still aborts, as upstream intends for programming errors.
#pragma once

#include "ggml.h"

#include <stdexcept>
#include <string>

class mcmoe_load_guard {
  public:
    mcmoe_load_guard() : prev_(ggml_set_abort_callback(&mcmoe_load_guard::raise)) {}
    ~mcmoe_load_guard() { ggml_set_abort_callback(prev_); }
    mcmoe_load_guard(const mcmoe_load_guard &) = delete;
    mcmoe_load_guard & operator=(const mcmoe_load_guard &) = delete;

  private:
    static void raise(const char * message) {
        // "<build path>/src/llama-vocab.cpp:2544: GGML_ASSERT(...) failed": keep file name, line, condition
        std::string m(message);
        const size_t colon = m.find(':');
        const size_t slash = m.rfind('/', colon);
        if (colon != std::string::npos && slash != std::string::npos) {
            m.erase(0, slash + 1);
        }
        throw std::runtime_error("invalid model file (" + m + ")");
    }
    ggml_abort_callback_t prev_;
};
