// mcmoe-gguf: our cases in llama.cpp's test-backend-ops (included by tests/test-backend-ops.cpp after its
// test_mul_mat_id; the patch adds one include and one call per case list).
//
// The mcq types are in test-backend-ops' own type lists (MUL_MAT, MUL_MAT_ID, GET_ROWS, CPY cases). What
// stock cases cannot reach is added here, so `test-backend-ops test -b CUDA0` compares a backend with the
// CPU on all of it (scripts/device_check.sh):
//   - MUL_MAT_ID with SKIPPED ids (mcmoe-ids.h: an id < 0 or >= n_as runs no expert and writes zeros),
//     which the mixed-width MoE layers and ODP produce; vars end in skip=1;
//   - the ODP op itself (GGML_OP_MCMOE_ODP, mcmoe-odp.h), both outputs, with and without protection;
//   - perf: MUL_MAT of a Mixtral expert matrix with a 256-token batch (scripts/bench_kernels.py).
#pragma once

#include "../ggml/mcmoe-odp.h"

#include <algorithm>
#include <random>

// mul_mat_id whose ids include skip markers: slot i of token r is skipped for (r*n_used + i) % 3 == 1,
// alternately as -1 and as n_mats (the marker ODP writes); every token keeps at least one slot at k = 2
struct test_mcmoe_mul_mat_id_skip : public test_mul_mat_id {
    test_mcmoe_mul_mat_id_skip(ggml_type type_a, int n_mats, int n_used, int64_t m, int64_t n, int64_t k)
        : test_mul_mat_id(type_a, GGML_TYPE_F32, n_mats, n_used, false, m, n, k) {}

    std::string vars() override {
        return test_mul_mat_id::vars() + ",skip=1";
    }

    void initialize_tensors(ggml_context * ctx) override {
        test_mul_mat_id::initialize_tensors(ctx);
        std::default_random_engine rng(1234);
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != NULL; t = ggml_get_next_tensor(ctx, t)) {
            if (t->type != GGML_TYPE_I32 || ggml_is_view_op(t->op)) {
                continue;
            }
            for (int64_t r = 0; r < ggml_nrows(t); r++) {
                std::vector<int32_t> data(t->ne[0]);
                for (int i = 0; i < t->ne[0]; i++) {
                    data[i] = i % n_mats;
                }
                std::shuffle(data.begin(), data.end(), rng);
                for (int i = 0; i < n_used; i++) {
                    if ((r*n_used + i) % 3 == 1) {
                        data[i] = r % 2 ? n_mats : -1;
                    }
                }
                ggml_backend_tensor_set(t, data.data(), r * t->nb[1], t->ne[0] * sizeof(int32_t));
            }
        }
    }
};

// GGML_OP_MCMOE_ODP: routing weights normalised per token (so the rule fires for some tokens and not for
// others), ids distinct per token, importance uniform; the output is a pure function of the inputs, so any
// difference between backends is a bug (max_nmse_err 0).
struct test_mcmoe_odp : public test_case {
    const int   what;       // enum mcmoe_odp_what
    const int   k;          // top-k slots
    const int   n_tokens;
    const float mu;
    const int   n_protect;  // > 0: with an importance input
    const int   n_expert = 8;

    std::string op_desc(ggml_tensor * t) override {
        GGML_UNUSED(t);
        return "MCMOE_ODP";
    }

    std::string vars() override {
        return VARS_TO_STR5(what, k, n_tokens, mu, n_protect);
    }

    double max_nmse_err() override {
        return 0.0;
    }

    test_mcmoe_odp(int what, int k, int n_tokens, float mu, int n_protect)
        : what(what), k(k), n_tokens(n_tokens), mu(mu), n_protect(n_protect) {}

    ggml_tensor * build_graph(ggml_context * ctx) override {
        ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, k, n_tokens);
        ggml_set_name(ids, "ids");
        ggml_tensor * w = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, k, n_tokens);
        ggml_set_name(w, "weights");
        ggml_tensor * imp = nullptr;
        if (n_protect > 0) {
            imp = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_tokens);
            ggml_set_name(imp, "importance");
        }
        mcmoe_odp_params p = { mu, n_protect, n_expert, MCMOE_ODP_MAX_LAYERS - 1, what };
        ggml_tensor * out = ggml_mcmoe_odp(ctx, ids, w, imp, p);
        ggml_set_name(out, "out");
        return out;
    }

    void initialize_tensors(ggml_context * ctx) override {
        std::default_random_engine rng(4321);
        std::uniform_real_distribution<float> u(0.0f, 1.0f);
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != NULL; t = ggml_get_next_tensor(ctx, t)) {
            if (t->type == GGML_TYPE_I32) {
                std::vector<int32_t> data(k * n_tokens);
                std::vector<int32_t> perm(n_expert);
                for (int r = 0; r < n_tokens; r++) {
                    for (int e = 0; e < n_expert; e++) {
                        perm[e] = e;
                    }
                    std::shuffle(perm.begin(), perm.end(), rng);
                    std::copy(perm.begin(), perm.begin() + k, data.begin() + r*k);
                }
                ggml_backend_tensor_set(t, data.data(), 0, data.size() * sizeof(int32_t));
            } else if (strcmp(t->name, "weights") == 0) {
                std::vector<float> data(k * n_tokens);
                for (int r = 0; r < n_tokens; r++) {
                    float s = 0.0f;
                    for (int i = 0; i < k; i++) {
                        data[r*k + i] = 0.01f + u(rng);
                        s += data[r*k + i];
                    }
                    for (int i = 0; i < k; i++) {
                        data[r*k + i] /= s;
                    }
                }
                ggml_backend_tensor_set(t, data.data(), 0, data.size() * sizeof(float));
            } else {
                init_tensor_uniform(t);
            }
        }
    }
};

static void mcmoe_add_eval_cases(std::vector<std::unique_ptr<test_case>> & test_cases) {
    for (ggml_type type : { GGML_TYPE_MCQ1, GGML_TYPE_MCQ2, GGML_TYPE_MCQ3, GGML_TYPE_MCQ4,
                            GGML_TYPE_Q2_K, GGML_TYPE_Q4_0, GGML_TYPE_F16 }) {
        for (int n : { 1, 4, 33, 129 }) {   // mat-vec, small batches, the batched kernels
            test_cases.emplace_back(new test_mcmoe_mul_mat_id_skip(type, 8, 2, 64, n, 512));
        }
    }
    for (int what : { MCMOE_ODP_WEIGHTS, MCMOE_ODP_IDS }) {
        for (int n_tokens : { 1, 7, 64, 300 }) {
            for (float mu : { 0.0f, 0.6f, 1.0f }) {
                test_cases.emplace_back(new test_mcmoe_odp(what, 2, n_tokens, mu, 0));
            }
            test_cases.emplace_back(new test_mcmoe_odp(what, 2, n_tokens, 0.6f, (n_tokens + 9) / 10));
            test_cases.emplace_back(new test_mcmoe_odp(what, 4, n_tokens, 0.5f, (n_tokens + 4) / 5));
        }
    }
}

// perf of the trellis types (mct, ../ggml/mct.h) at the Mixtral expert shape: stock perf cases fill a quantized
// weight by quantizing random floats, which for mct runs the reference Viterbi (~10 minutes for one 4096 x 14336
// matrix on 2 cores). The mat-vec's work does not depend on the codes (no data-dependent branch), so these cases
// fill the weight with random code bytes and a fixed fp16 d per block instead; vars start with init=codes, so
// `-p init=codes,type_a=mct2,...` selects them (mcmoe_gguf/engine/kernel_costs.py).
struct test_mcmoe_mul_mat_codes : public test_mul_mat {
    test_mcmoe_mul_mat_codes(ggml_type type_a, int64_t n)
        : test_mul_mat(type_a, GGML_TYPE_F32, 4096, n, 14336, {1, 1}, {1, 1}) {}

    std::string vars() override {
        return "init=codes," + test_mul_mat::vars();
    }

    void initialize_tensors(ggml_context * ctx) override {
        std::default_random_engine rng(42);
        std::uniform_int_distribution<int> byte(0, 255);
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != NULL; t = ggml_get_next_tensor(ctx, t)) {
            if (t->type != type_a) {
                init_tensor_uniform(t);
                continue;
            }
            std::vector<uint8_t> data(ggml_nbytes(t));
            for (auto & b : data) {
                b = (uint8_t) byte(rng);
            }
            const ggml_fp16_t d = ggml_fp32_to_fp16(0.01f);
            for (size_t o = 0; o + sizeof(d) <= data.size(); o += ggml_type_size(t->type)) {
                memcpy(data.data() + o, &d, sizeof(d));  // every block starts with its fp16 d
            }
            ggml_backend_tensor_set(t, data.data(), 0, data.size());
        }
    }
};

// perf: a Mixtral expert matrix (4096 x 14336) with a 256-token prompt batch, the prefill size the kernel
// table reports (stock perf cases have n = 1..8 and 512), for our types and the stock ones they compete with
static void mcmoe_add_perf_cases(std::vector<std::unique_ptr<test_case>> & test_cases) {
    for (ggml_type type : { GGML_TYPE_MCQ1, GGML_TYPE_MCQ2, GGML_TYPE_MCQ3, GGML_TYPE_MCQ4, GGML_TYPE_MCN2,
                            GGML_TYPE_MCN3, GGML_TYPE_Q2_K,
                            GGML_TYPE_Q3_K, GGML_TYPE_IQ2_XXS, GGML_TYPE_Q4_0 }) {
        test_cases.emplace_back(new test_mul_mat(type, GGML_TYPE_F32, 4096, 256, 14336, {1, 1}, {1, 1}));
    }
    for (ggml_type type : { GGML_TYPE_MCT1, GGML_TYPE_MCT2, GGML_TYPE_MCT3 }) {
        for (int64_t n : { 1, 256 }) {
            test_cases.emplace_back(new test_mcmoe_mul_mat_codes(type, n));
        }
    }
}
