// mcmoe-gguf: a correct AMX tile setup for ggml-cpu's AMX matmul (llama.cpp issue #20824, PR #26954).
//
// ggml-cpu/amx/mmq.cpp builds its tile configuration in a stack variable and hands its address to
// _tile_loadconfig. GCC does not model that the ldtilecfg builtin reads the 64 bytes behind the pointer,
// so dead-store elimination may drop the field stores and ldtilecfg loads whatever the stack held: the
// next tile instruction then faults (SIGSEGV in ggml_backend_amx_mul_mat on Sapphire Rapids). Here the
// configuration is a constant object in static storage, initialised at compile time, so there are no
// stores to drop. Linux also gates the AMX tile data state (XTILEDATA) behind arch_prctl: ggml asks once
// on the thread that creates the buffer type; every worker thread that runs tile instructions asks again
// before its first ldtilecfg. Measured on a Xeon (Sapphire Rapids, GCC 12): the static configuration
// alone removes the crash (SIGILL with Q8_0, SIGSEGV with Q4_K in a 128-token prompt), because the
// permission is process-wide on current kernels; the per-thread request is kept as cheap, idempotent
// insurance for kernels that grant it otherwise.
#pragma once

#include <stdint.h>

#if defined(__AMX_INT8__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// the layout ldtilecfg reads (Intel SDM, "TILECFG"): 64 bytes
struct mcmoe_amx_tilecfg {
    uint8_t  palette_id;
    uint8_t  start_row;
    uint8_t  reserved[14];
    uint16_t colsb[16];
    uint8_t  rows[16];
};

// ggml's 2-2-4 tile pattern (see the notes above ggml_tile_config_init in amx/mmq.cpp):
// TMM0-1 B (8 rows x 64 bytes, VNNI-packed), TMM2-3 A (16 x 32 bytes), TMM4-7 C (16 x 16 int32)
alignas(64) static const struct mcmoe_amx_tilecfg mcmoe_amx_tilecfg_2_2_4 = {
    1, 0, {0},
    {64, 64, 32, 32, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0},
    { 8,  8, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0},
};

// once per thread: tile-data permission, then the static configuration
static inline void mcmoe_amx_thread_init(void) {
    static thread_local bool done = false;
    if (done) {
        return;
    }
#if defined(__linux__)
    // ARCH_REQ_XCOMP_PERM (0x1023), XFEATURE_XTILEDATA (18); failure shows up as ggml's own
    // "AMX is not ready to be used!" when the buffer type is created, so it is not reported twice
    (void) syscall(SYS_arch_prctl, 0x1023, 18);
#endif
    _tile_loadconfig(&mcmoe_amx_tilecfg_2_2_4);
    done = true;
}
#endif
