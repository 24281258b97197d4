// mcmoe-gguf: quick timing of the mcq vec_dot kernels (SIMD dispatch vs scalar reference), one thread.
//
//   V=.dev/llama_cpp_python-0.3.36/vendor/llama.cpp   (after `make dev-runtime`, from the repository root)
//   cc -O2 -o /tmp/bench-mcq cpp/tests/bench-mcq-vec-dot.c -I$V/ggml/include -Icpp/ggml -Icpp/ggml-cpu
//      -L.dev/build/bin -lggml-cpu -lggml-base -Wl,-rpath,$PWD/.dev/build/bin
//   /tmp/bench-mcq [rows] [n]
//
// Two regimes: "cached" repeats one row of n weights (compute bound), "matrix" streams rows x n weights
// (for a Mixtral expert, 4096 x 14336, the weights do not fit in cache: memory bound, what decode sees).
#include "mcq-cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

typedef float (*dot_fn)(enum ggml_type, int, const void *, const void *);

static double bench(dot_fn f, enum ggml_type t, int rows, int n, const char * w, size_t row_bytes, const void * y,
                    int reps, float * sink) {
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
        const double t0 = now();
        float acc = 0;
        for (int i = 0; i < rows; ++i) {
            acc += f(t, n, w + (size_t) i * row_bytes, y);
        }
        const double dt = now() - t0;
        *sink += acc;
        best = dt < best ? dt : best;
    }
    return best;
}

int main(int argc, char ** argv) {
    const int rows = argc > 1 ? atoi(argv[1]) : 4096;
    const int n    = argc > 2 ? atoi(argv[2]) : 14336;
    ggml_cpu_init();

    float * x = malloc(sizeof(float) * n);
    srand(1);
    for (int i = 0; i < n; ++i) {
        x[i] = (float) rand() / RAND_MAX - 0.5f;
    }
    void * y = malloc((size_t) n / 256 * 292);
    ggml_get_type_traits_cpu(GGML_TYPE_Q8_K)->from_float(x, y, n);

    printf("mcq vec_dot against Q8_K, n = %d, kernel: %s\n", n, mcq_cpu_simd());
    float sink = 0;
    for (int bits = 1; bits <= 4; ++bits) {
        const enum ggml_type t = (enum ggml_type) (GGML_TYPE_MCQ1 + bits - 1);
        const size_t row_bytes = ggml_row_size(t, n);
        char * w = malloc(row_bytes * rows);
        for (size_t i = 0; i < row_bytes * rows; ++i) {
            w[i] = (char) rand();
        }
        for (int i = 0; i < rows * (n / 128); ++i) {  // finite d, m
            memset(w + (size_t) i * (4 + bits * 16), 0x30, 4);
        }
        const double c_simd = bench(mcq_vec_dot,     t, 1, n, w, row_bytes, y, 2000, &sink);
        const double c_ref  = bench(mcq_vec_dot_ref, t, 1, n, w, row_bytes, y, 200,  &sink);
        const double m_simd = bench(mcq_vec_dot,     t, rows, n, w, row_bytes, y, 5, &sink);
        const double m_ref  = bench(mcq_vec_dot_ref, t, rows, n, w, row_bytes, y, 2, &sink);
        printf("mcq%d  cached row: simd %8.2f us  scalar %8.2f us  (x%.1f) | %d rows (%.1f MB): simd %7.2f ms (%.2f GB/s)"
               "  scalar %8.2f ms  (x%.1f)\n",
               bits, c_simd * 1e6, c_ref * 1e6, c_ref / c_simd, rows, row_bytes * rows / 1e6, m_simd * 1e3,
               row_bytes * rows / m_simd / 1e9, m_ref * 1e3, m_ref / m_simd);
        free(w);
    }
    fprintf(stderr, "(%g)\n", sink);
    free(x);
    free(y);
    return 0;
}
