// lab-llama-driver: the llamacpp harness's own program, locked (driver.py runs it).
//
// Built by the harness from this file against the libllama/ggml of the tree under test, so the
// candidate's ggml code runs in it; nothing it reports is trusted. It exists so that the run
// that is timed is the run that is checked: the oracle's greedy check and every timed sample run
// this same binary with the same argv shape, and every answer carries the generated tokens.
//
//   lab-llama-driver MODEL THREADS GPU_LAYERS CTX            generate: one request, then exit
//   lab-llama-driver MODEL THREADS GPU_LAYERS CTX --score    score (pristine build only): many
//
// generate: loads the model, warms up (a fixed prompt, one token, memory cleared), prints
// {"event":"ready"} and reads ONE request line `N_GEN HEX_PROMPT` (the prompt's UTF-8 bytes in
// hex). It tokenises the prompt (BOS as the model wants it), decodes it in one batch, then N_GEN
// times: takes the argmax of the last logits (ties: the lowest id) and decodes that token. It
// answers one JSON line: the N_GEN tokens, the prompt's token count, a digest of the logits after
// the last decode (top 8, sum of squares, FNV-1a of the bytes) and its own timings (informational:
// the harness times the request on its own clock). Then it exits.
//
// score: for each line `HEX_PROMPT N T1 .. TN` it runs the generation's own path teacher-forced
// (memory cleared, the prompt in one batch, then T1..TN one decode each) and answers, for the N+1
// positions that predict T1..TN and the one after TN: argmax, max, the logit of the given token,
// sum of squares; and the last row's top 64. (A one-batch pass would be cheaper, but its logits
// differ from the decode path's by up to 0.2 x the RMS logit on this model: too loose a reference.)
//
// The protocol goes over a private copy of fd 1 made before the model loads; fd 1 then points at
// stderr, so whatever the libraries print is log, never protocol.

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unistd.h>
#include <vector>

static FILE * g_out = nullptr;

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

[[noreturn]] static void fail(const char * what) {
    fprintf(g_out ? g_out : stdout, "{\"error\":\"%s\"}\n", what);
    fflush(g_out ? g_out : stdout);
    exit(1);
}

static bool read_line(std::string & line) {
    line.clear();
    int c;
    while ((c = fgetc(stdin)) != EOF) {
        if (c == '\n') {
            return true;
        }
        line.push_back((char) c);
    }
    return !line.empty();
}

static std::string unhex(const std::string & hex) {
    std::string out;
    if (hex.size() % 2) {
        fail("odd hex length");
    }
    for (size_t i = 0; i < hex.size(); i += 2) {
        out.push_back((char) strtol(hex.substr(i, 2).c_str(), nullptr, 16));
    }
    return out;
}

static std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text) {
    std::vector<llama_token> tokens(text.size() + 8);
    int n = llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(), true, false);
    if (n < 0) {
        tokens.resize(-n);
        n = llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(), true, false);
    }
    if (n <= 0) {
        fail("tokenize");
    }
    tokens.resize(n);
    return tokens;
}

static int argmax(const float * row, int n_vocab) {
    int best = 0;
    for (int i = 1; i < n_vocab; i++) {
        if (row[i] > row[best]) {
            best = i;
        }
    }
    return best;
}

static double sumsq(const float * row, int n_vocab) {
    double s = 0.0;
    for (int i = 0; i < n_vocab; i++) {
        s += (double) row[i] * row[i];
    }
    return s;
}

static void print_top(const float * row, int n_vocab, int k) {
    std::vector<int> ids(n_vocab);
    for (int i = 0; i < n_vocab; i++) {
        ids[i] = i;
    }
    k = std::min(k, n_vocab);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [row](int a, int b) {
        return row[a] > row[b] || (row[a] == row[b] && a < b);
    });
    fputc('[', g_out);
    for (int i = 0; i < k; i++) {
        fprintf(g_out, "%s[%d,%.9g]", i ? "," : "", ids[i], row[ids[i]]);
    }
    fputc(']', g_out);
}

static int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

static void decode(llama_context * ctx, llama_batch batch) {
    if (llama_decode(ctx, batch) != 0) {
        fail("llama_decode");
    }
}

static void generate(llama_context * ctx, const llama_vocab * vocab, int n_vocab) {
    // warm-up: first touch of weights and buffers, the same in every run
    {
        std::vector<llama_token> warm = tokenize(vocab, "Hello");
        decode(ctx, llama_batch_get_one(warm.data(), (int32_t) warm.size()));
        llama_token t = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
        decode(ctx, llama_batch_get_one(&t, 1));
        llama_memory_clear(llama_get_memory(ctx), true);
    }
    fprintf(g_out, "{\"event\":\"ready\"}\n");
    fflush(g_out);

    std::string line;
    if (!read_line(line)) {
        fail("no request");
    }
    const size_t space = line.find(' ');
    if (space == std::string::npos) {
        fail("malformed request");
    }
    const int n_gen = atoi(line.substr(0, space).c_str());
    if (n_gen <= 0) {
        fail("n_gen");
    }
    std::vector<llama_token> prompt = tokenize(vocab, unhex(line.substr(space + 1)));

    const int64_t t0 = now_us();
    decode(ctx, llama_batch_get_one(prompt.data(), (int32_t) prompt.size()));
    const int64_t t1 = now_us();
    std::vector<llama_token> out;
    out.reserve(n_gen);
    for (int i = 0; i < n_gen; i++) {
        llama_token t = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
        out.push_back(t);
        decode(ctx, llama_batch_get_one(&t, 1));
    }
    const int64_t t2 = now_us();
    const float * last = llama_get_logits_ith(ctx, -1);
    uint64_t fnv = 1469598103934665603ULL;
    const unsigned char * bytes = (const unsigned char *) last;
    for (size_t i = 0; i < (size_t) n_vocab * sizeof(float); i++) {
        fnv = (fnv ^ bytes[i]) * 1099511628211ULL;
    }
    fprintf(g_out, "{\"n_prompt\":%d,\"tokens\":[", (int) prompt.size());
    for (int i = 0; i < n_gen; i++) {
        fprintf(g_out, "%s%d", i ? "," : "", out[i]);
    }
    fprintf(g_out, "],\"final\":{\"top\":");
    print_top(last, n_vocab, 8);
    fprintf(g_out, ",\"sumsq\":%.17g,\"fnv1a\":\"%016" PRIx64 "\"},\"prefill_us\":%" PRId64 ",\"decode_us\":%" PRId64 "}\n",
            sumsq(last, n_vocab), fnv, t1 - t0, t2 - t1);
    fflush(g_out);
}

static void score(llama_context * ctx, const llama_vocab * vocab, int n_vocab, int n_ctx) {
    fprintf(g_out, "{\"event\":\"ready\"}\n");
    fflush(g_out);
    std::string line;
    while (read_line(line)) {
        std::vector<std::string> parts;
        size_t at = 0;
        while (at <= line.size()) {
            size_t next = line.find(' ', at);
            if (next == std::string::npos) {
                next = line.size();
            }
            if (next > at) {
                parts.push_back(line.substr(at, next - at));
            }
            at = next + 1;
        }
        if (parts.size() < 2) {
            fail("malformed score request");
        }
        std::vector<llama_token> prompt = tokenize(vocab, unhex(parts[0]));
        const int n = atoi(parts[1].c_str());
        if (n < 0 || (int) parts.size() != 2 + n || (int) prompt.size() + n > n_ctx) {
            fail("score request size");
        }
        std::vector<llama_token> given(n);
        for (int i = 0; i < n; i++) {
            given[i] = atoi(parts[2 + i].c_str());
            if (given[i] < 0 || given[i] >= n_vocab) {
                fail("score token out of range");
            }
        }
        // exactly the generation's path (one batch for the prompt, then one token per decode),
        // teacher-forced on the given tokens: where they are the pristine build's own choices,
        // every row is bit for bit what its generation computed
        llama_memory_clear(llama_get_memory(ctx), true);
        decode(ctx, llama_batch_get_one(prompt.data(), (int32_t) prompt.size()));
        fprintf(g_out, "{\"n_prompt\":%d,\"n_vocab\":%d,\"rows\":[", (int) prompt.size(), n_vocab);
        for (int r = 0; r <= n; r++) {
            const float * row = llama_get_logits_ith(ctx, -1);
            const int best = argmax(row, n_vocab);
            fprintf(g_out, "%s[%d,%.9g,%.9g,%.17g]", r ? "," : "", best, row[best],
                    r < n ? row[given[r]] : row[best], sumsq(row, n_vocab));
            if (r == n) {
                fprintf(g_out, "],\"top\":");
                print_top(row, n_vocab, 64);
            } else {
                llama_token t = given[r];
                decode(ctx, llama_batch_get_one(&t, 1));
            }
        }
        fprintf(g_out, "}\n");
        fflush(g_out);
    }
}

int main(int argc, char ** argv) {
    // the protocol channel first: a private copy of fd 1, which then points at stderr
    const int fd = dup(1);
    if (fd < 0 || dup2(2, 1) < 0 || !(g_out = fdopen(fd, "w"))) {
        return 2;
    }
    if (argc != 5 && !(argc == 6 && strcmp(argv[5], "--score") == 0)) {
        fail("usage: lab-llama-driver MODEL THREADS GPU_LAYERS CTX [--score]");
    }
    const bool scoring = argc == 6;
    const int threads = atoi(argv[2]);
    const int n_ctx = atoi(argv[4]);
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = atoi(argv[3]);
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) {
        fail("model load");
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n_ctx;
    cparams.n_batch = n_ctx;
    cparams.n_ubatch = n_ctx;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    cparams.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        fail("context");
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    if (scoring) {
        score(ctx, vocab, n_vocab, n_ctx);
    } else {
        generate(ctx, vocab, n_vocab);
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
