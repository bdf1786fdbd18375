// kvtuner-edge: logits of the patched engine for a fixed token sequence, to compare one build with another
// (scripts/aarch64_engine_check.py runs an aarch64 build of this under qemu-user against the x86 engine).
// The cache types come from the model's kvtuner.* metadata or KVTUNER_KV_TYPES, as in every llama.cpp tool.
//   kvq_logits MODEL.gguf TOKENS.txt OUT.bin N_PROMPT
// TOKENS.txt: token ids separated by white space. The first N_PROMPT tokens are decoded as one batch
// (the logits of its last position kept), then the rest one token at a time (decode: flash attention's
// one-row kernel, the K.Q dot products of the cache types); OUT.bin gets the kept rows as float32.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char ** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKENS.txt OUT.bin N_PROMPT\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> tokens;
    {
        FILE * f = fopen(argv[2], "r");
        if (!f) { perror(argv[2]); return 2; }
        int t;
        while (fscanf(f, "%d", &t) == 1) tokens.push_back(t);
        fclose(f);
    }
    const int n_prompt = atoi(argv[4]);
    if (n_prompt < 1 || n_prompt > (int) tokens.size()) {
        fprintf(stderr, "N_PROMPT must be 1..%zu\n", tokens.size());
        return 2;
    }
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx   = 512;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = cp.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = fopen(argv[3], "wb");
    if (!out) { perror(argv[3]); return 2; }
    for (int i = 0; i < (int) tokens.size(); ) {
        const int n = i == 0 ? n_prompt : 1;
        if (llama_decode(ctx, llama_batch_get_one(tokens.data() + i, n)) != 0) {
            fprintf(stderr, "decode failed at %d\n", i);
            return 1;
        }
        fwrite(llama_get_logits_ith(ctx, -1), sizeof(float), n_vocab, out);
        i += n;
    }
    fclose(out);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
