// kvtuner-edge: per-layer K/V cache types for llama.cpp (public C API).
//
// A context gets one K type and one V type per layer from, in order of precedence:
//   1. an explicit global cache type: llama_context_params.type_k or .type_v other than f16
//      turns the per-layer types off (the user asked for one type everywhere);
//   2. the process-wide override set with llama_kvtuner_set_override(), else the environment
//      variable KVTUNER_KV_TYPES (same syntax; reachable from llama-server and the CLI tools);
//   3. the GGUF metadata arrays "kvtuner.type_k" and "kvtuner.type_v": arrays of strings, exactly
//      one cache type name per layer (block_count entries), for example ["q8_0", "q4_0", ...];
//      a key left out keeps the global type (f16) on that side.
// Cache types: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl, q2_0, q3_kv, q2_kv (names
// case-insensitive); other ggml types are refused with a message.
//
// Override syntax:  "off"  |  part [";" part]
//   part  := ("k" | "v") "=" item ["," item]...
//   item  := <cache type name> ["*" <count>]
// One item without a count applies to every layer ("k=q8_0;v=q4_0"); otherwise the counts
// (decimal, positive) must add up to the model's block_count ("k=q8_0*3,q4_0*24,q8_0*3;v=q4_0").
// A part left out keeps the global type (f16); a part given twice is an error.  "off" ignores the
// file's per-layer types.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    // version of this interface; its presence tells a patched build from a stock one
    LLAMA_API int32_t llama_kvtuner_version(void);

    // set (spec != NULL) or clear (spec == NULL) the process-wide override used by contexts
    // created afterwards; the spec is checked when a context is created, not here
    LLAMA_API void llama_kvtuner_set_override(const char * spec);

    // the message of the last per-layer configuration error on this thread ("" if none)
    LLAMA_API const char * llama_kvtuner_last_error(void);

    // the ggml type really allocated for layer il's K (is_v = false) or V (is_v = true) cache
    // in this context, or -1 when the layer has no cache of that kind here
    LLAMA_API int32_t llama_kvtuner_layer_type(const struct llama_context * ctx, int32_t il, bool is_v);

    // bytes allocated for layer il's K or V cache in this context (all streams), 0 when it has none
    LLAMA_API int64_t llama_kvtuner_layer_bytes(const struct llama_context * ctx, int32_t il, bool is_v);

#ifdef __cplusplus
}

#include <string>
#include <vector>

struct llama_model;
struct gguf_context;

// internal: the per-layer types a context will use (empty vectors: one global type)
struct llama_kvtuner_types {
    std::vector<ggml_type> k;
    std::vector<ggml_type> v;
    std::string            source; // "override", "KVTUNER_KV_TYPES" or "gguf"

    bool active() const { return !k.empty(); }
};

// internal: resolve the per-layer types for the given global types; throws std::runtime_error
// with a message naming the layer and the problem
llama_kvtuner_types llama_kvtuner_resolve(const llama_model & model, ggml_type type_k, ggml_type type_v);

// internal: resolve and validate against the context parameters before anything is allocated;
// enables flash attention when it is on auto and a V cache is quantized; on failure logs the
// error, keeps it for llama_kvtuner_last_error() and returns false
bool llama_kvtuner_check(const llama_model & model, llama_context_params & params);

// internal: the string the model loader keeps for metadata key i when it is under "kvtuner.": for
// kvtuner.type_k/type_v the array's string form if it is an array of at most LLAMA_MAX_LAYERS plain
// type names, else a marked message that context creation reports; other keys as gguf_kv_to_str
std::string llama_kvtuner_gguf_value(const struct gguf_context * ctx, int64_t i);

// internal: compact run-length form of a type list, e.g. "q8_0*3,q4_0*24,q8_0*3"
std::string llama_kvtuner_types_str(const std::vector<ggml_type> & types);

#endif
