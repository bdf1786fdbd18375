// kvtuner-edge: per-layer K/V cache types for llama.cpp.
// Resolution of the per-layer configuration, its validation, and introspection.
// See llama-kvtuner.h for the precedence rules and the override syntax.

#include "llama-kvtuner.h"

#include "llama-impl.h"
#include "llama-arch.h"
#include "llama-model.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-hybrid-iswa.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

static std::mutex  g_override_mutex;
static bool        g_override_set = false;
static std::string g_override;

static thread_local std::string g_last_error;

int32_t llama_kvtuner_version(void) {
    return 1;
}

void llama_kvtuner_set_override(const char * spec) {
    std::lock_guard<std::mutex> lock(g_override_mutex);
    g_override_set = spec != nullptr;
    g_override     = spec ? spec : "";
}

const char * llama_kvtuner_last_error(void) {
    return g_last_error.c_str();
}

static std::string trim(const std::string & s) {
    size_t b = 0;
    size_t e = s.size();
    while (b < e && (isspace((unsigned char) s[b]) || s[b] == '"')) { b++; }
    while (e > b && (isspace((unsigned char) s[e - 1]) || s[e - 1] == '"')) { e--; }
    return s.substr(b, e - b);
}

static std::vector<std::string> split(const std::string & s, char sep) {
    std::vector<std::string> out;
    size_t start = 0;
    while (true) {
        const size_t pos = s.find(sep, start);
        out.push_back(s.substr(start, pos == std::string::npos ? std::string::npos : pos - start));
        if (pos == std::string::npos) {
            break;
        }
        start = pos + 1;
    }
    return out;
}

// ggml type by name, case-insensitive; GGML_TYPE_COUNT when unknown
static ggml_type type_by_name(const std::string & name) {
    for (int i = 0; i < GGML_TYPE_COUNT; ++i) {
        const char * tn = ggml_type_name((ggml_type) i);
        if (tn == nullptr || ggml_type_size((ggml_type) i) == 0) {
            continue; // removed types keep their slot but have no traits
        }
        if (strlen(tn) == name.size() &&
                std::equal(name.begin(), name.end(), tn, [](char a, char b) { return tolower((unsigned char) a) == tolower((unsigned char) b); })) {
            return (ggml_type) i;
        }
    }
    return GGML_TYPE_COUNT;
}

static std::string fmt(const char * f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof(buf), f, ap);
    va_end(ap);
    return buf;
}

// a name from a file or the environment, safe to print: bytes outside printable ASCII as \xNN, cut at 40
static std::string printable(const std::string & s) {
    const size_t limit = 40;
    std::string out;
    for (size_t i = 0; i < s.size() && i < limit; ++i) {
        const unsigned char c = s[i];
        if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
            out += (char) c;
        } else {
            out += fmt("\\x%02x", c);
        }
    }
    if (s.size() > limit) {
        out += fmt("... (%zu bytes)", s.size());
    }
    return out;
}

// the types a KV cache can hold: what llama.cpp's tools accept for -ctk/-ctv, ggml's q2_0 and our
// q3_kv/q2_kv (kvtuner_edge/types.py has the same list); other ggml types (k-quants, i-quants,
// integers, f64) may pass the backend's support probes and then crash in the attention kernels
static bool is_cache_type(ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_IQ4_NL:
        case GGML_TYPE_Q3_KV:
        case GGML_TYPE_Q2_KV:
        case GGML_TYPE_Q2_0:
            return true;
        default:
            return false;
    }
}

static std::string cache_type_names() {
    std::string out;
    for (int i = 0; i < GGML_TYPE_COUNT; ++i) {
        if (is_cache_type((ggml_type) i)) {
            out += (out.empty() ? "" : ", ") + std::string(ggml_type_name((ggml_type) i));
        }
    }
    return out;
}

static ggml_type cache_type(const std::string & name, const char * which, size_t layer, const std::string & source) {
    const ggml_type t = type_by_name(name);
    if (t == GGML_TYPE_COUNT) {
        throw std::runtime_error(fmt("kvtuner (%s): layer %zu: unknown %s cache type '%s'",
                    source.c_str(), layer, which, printable(name).c_str()));
    }
    if (!is_cache_type(t)) {
        throw std::runtime_error(fmt("kvtuner (%s): layer %zu: %s cache type %s is not a KV cache type (%s)",
                    source.c_str(), layer, which, ggml_type_name(t), cache_type_names().c_str()));
    }
    return t;
}

// expands "q8_0*3,q4_0*27" (or a single "q8_0" for every layer) into n_layer types
static std::vector<ggml_type> parse_list(const std::string & list, const char * which, uint32_t n_layer, const std::string & source) {
    std::vector<ggml_type> out;
    const auto items = split(list, ',');
    for (const auto & raw : items) {
        const std::string item = trim(raw);
        std::string name  = item;
        long long   count = -1;
        const size_t star = item.find('*');
        if (star != std::string::npos) {
            name = trim(item.substr(0, star));
            const std::string cnt = trim(item.substr(star + 1));
            char * end = nullptr;
            errno = 0;
            count = strtoll(cnt.c_str(), &end, 10);
            if (cnt.empty() || !isdigit((unsigned char) cnt[0]) || *end != '\0' || errno == ERANGE || count <= 0) {
                throw std::runtime_error(fmt("kvtuner (%s): bad repeat count '%s' in %s types", source.c_str(), printable(cnt).c_str(), which));
            }
        }
        const ggml_type t = cache_type(name, which, out.size(), source);
        if (items.size() == 1 && count < 0) {
            return std::vector<ggml_type>(n_layer, t);
        }
        // bounded before anything is allocated: a count of 2^31 must not build a list of 2^31 types
        if ((unsigned long long) (count < 0 ? 1 : count) > n_layer - out.size()) {
            throw std::runtime_error(fmt("kvtuner (%s): more than %u %s cache types given, but the model has %u layers",
                        source.c_str(), n_layer, which, n_layer));
        }
        out.insert(out.end(), count < 0 ? 1 : (size_t) count, t);
    }
    if (out.size() != n_layer) {
        throw std::runtime_error(fmt("kvtuner (%s): %zu %s cache types given, but the model has %u layers",
                    source.c_str(), out.size(), which, n_layer));
    }
    return out;
}

// marks a kvtuner.type_k/v value the model loader found unusable; the message follows
static const char KVTUNER_BAD_META = '\x01';

// a GGUF value type in words, as kvtuner_edge's reader names it
static const char * gguf_type_words(gguf_type t) {
    static const char * names[] = { "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool",
                                    "string", "array", "uint64", "int64", "float64" };
    return (int) t >= 0 && (size_t) t < sizeof(names) / sizeof(names[0]) ? names[t] : "value of unknown type";
}

std::string llama_kvtuner_gguf_value(const struct gguf_context * ctx, int64_t i) {
    const char * key = gguf_get_key(ctx, i);
    if (strcmp(key, "kvtuner.type_k") != 0 && strcmp(key, "kvtuner.type_v") != 0) {
        return gguf_kv_to_str(ctx, i);
    }
    const gguf_type t = gguf_get_kv_type(ctx, i);
    if (t != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx, i) != GGUF_TYPE_STRING) {
        const std::string tn = t == GGUF_TYPE_ARRAY ? std::string("array of ") + gguf_type_words(gguf_get_arr_type(ctx, i)) : gguf_type_words(t);
        return KVTUNER_BAD_META + fmt("%s is %s %s, not an array of cache type names", key,
                strchr("aeiou", tn[0]) ? "an" : "a", tn.c_str());
    }
    const size_t n = gguf_get_arr_n(ctx, i);
    if (n > LLAMA_MAX_LAYERS) {
        return KVTUNER_BAD_META + fmt("%s has %zu entries, more than a model's %d layers", key, n, LLAMA_MAX_LAYERS);
    }
    // the names are plain (letters, digits, '_'), so the string form ["a", "b"] below is unambiguous
    for (size_t j = 0; j < n; ++j) {
        const std::string name = gguf_get_arr_str(ctx, i, j);
        const bool plain = !name.empty() && name.size() <= 64 &&
            std::all_of(name.begin(), name.end(), [](char c) { return isalnum((unsigned char) c) || c == '_'; });
        if (!plain) {
            return KVTUNER_BAD_META + fmt("%s: layer %zu: '%s' is not a KV cache type (%s)", key, j,
                    printable(name).c_str(), cache_type_names().c_str());
        }
    }
    return gguf_kv_to_str(ctx, i);
}

// the GGUF array, kept by the model loader (llama_kvtuner_gguf_value) as its string form ["q8_0", "q4_0", ...]
static bool meta_list(const llama_model & model, const char * key, std::string & out) {
    const auto it = model.gguf_kv.find(key);
    if (it == model.gguf_kv.end()) {
        return false;
    }
    out = it->second;
    return true;
}

// a file's list: exactly one plain type name per layer (no counts, no single entry for all layers)
static std::vector<ggml_type> parse_meta(const std::string & value, const char * key, uint32_t n_layer) {
    if (!value.empty() && value[0] == KVTUNER_BAD_META) {
        throw std::runtime_error("kvtuner (gguf): " + value.substr(1));
    }
    std::string s = trim(value);
    if (s.size() >= 2 && s.front() == '[' && s.back() == ']') {
        s = s.substr(1, s.size() - 2);
    }
    const auto items = trim(s).empty() ? std::vector<std::string>() : split(s, ',');
    if (items.size() != n_layer) {
        throw std::runtime_error(fmt("kvtuner (gguf): %s has %zu entries for %u layers", key, items.size(), n_layer));
    }
    std::vector<ggml_type> out;
    for (const auto & raw : items) {
        const std::string name = trim(raw);
        const ggml_type   t    = type_by_name(name);
        if (t == GGML_TYPE_COUNT || !is_cache_type(t)) {
            throw std::runtime_error(fmt("kvtuner (gguf): %s: layer %zu: '%s' is not a KV cache type (%s)",
                        key, out.size(), printable(name).c_str(), cache_type_names().c_str()));
        }
        out.push_back(t);
    }
    return out;
}

static bool arch_supported(const llama_model & model) {
    if (model.hparams.is_mla()) {
        return false;
    }
    // these build their attention graphs with the cache-wide rotation or use side caches
    switch (model.arch) {
        case LLM_ARCH_DEEPSEEK4:
        case LLM_ARCH_DEEPSEEK32:
        case LLM_ARCH_GLM_DSA:
        case LLM_ARCH_DOTS3NOTE:
        case LLM_ARCH_QWEN4EXP:
        case LLM_ARCH_MINIMAX_M3:
        case LLM_ARCH_DFLASH:
            return false;
        default:
            return true;
    }
}

llama_kvtuner_types llama_kvtuner_resolve(const llama_model & model, ggml_type type_k, ggml_type type_v) {
    llama_kvtuner_types res;

    const uint32_t n_layer = model.hparams.n_layer_all;

    std::string spec;
    bool        have_spec = false;
    {
        std::lock_guard<std::mutex> lock(g_override_mutex);
        if (g_override_set) {
            spec      = g_override;
            have_spec = true;
            res.source = "override";
        }
    }
    if (!have_spec) {
        const char * env = getenv("KVTUNER_KV_TYPES");
        if (env != nullptr && env[0] != '\0') {
            spec       = env;
            have_spec  = true;
            res.source = "KVTUNER_KV_TYPES";
        }
    }

    std::string list_k;
    std::string list_v;
    bool have_k = false;
    bool have_v = false;

    if (have_spec) {
        if (trim(spec) == "off") {
            return {};
        }
        for (const auto & part_raw : split(spec, ';')) {
            const std::string part = trim(part_raw);
            if (part.empty()) {
                continue;
            }
            const size_t eq = part.find('=');
            const std::string key = eq == std::string::npos ? "" : trim(part.substr(0, eq));
            const bool is_k = key == "k" || key == "K";
            const bool is_v = key == "v" || key == "V";
            if (!is_k && !is_v) {
                throw std::runtime_error(fmt("kvtuner (%s): cannot parse '%s': expected 'k=TYPES' or 'v=TYPES'",
                            res.source.c_str(), printable(part).c_str()));
            }
            if ((is_k && have_k) || (is_v && have_v)) {
                throw std::runtime_error(fmt("kvtuner (%s): %s types given twice", res.source.c_str(), is_k ? "K" : "V"));
            }
            (is_k ? list_k : list_v) = part.substr(eq + 1);
            (is_k ? have_k : have_v) = true;
        }
    } else {
        have_k = meta_list(model, "kvtuner.type_k", list_k);
        have_v = meta_list(model, "kvtuner.type_v", list_v);
        res.source = "gguf";
    }

    if (!have_k && !have_v) {
        return {};
    }

    if (type_k != GGML_TYPE_F16 || type_v != GGML_TYPE_F16) {
        LLAMA_LOG_INFO("%s: explicit cache types K=%s V=%s given: per-layer types from %s are not used\n",
                __func__, ggml_type_name(type_k), ggml_type_name(type_v), res.source.c_str());
        return {};
    }

    if (!arch_supported(model)) {
        throw std::runtime_error(fmt("kvtuner (%s): per-layer cache types are not supported for architecture %s",
                    res.source.c_str(), llm_arch_name(model.arch)));
    }

    if (have_spec) {
        res.k = have_k ? parse_list(list_k, "K", n_layer, res.source) : std::vector<ggml_type>(n_layer, type_k);
        res.v = have_v ? parse_list(list_v, "V", n_layer, res.source) : std::vector<ggml_type>(n_layer, type_v);
    } else {
        res.k = have_k ? parse_meta(list_k, "kvtuner.type_k", n_layer) : std::vector<ggml_type>(n_layer, type_k);
        res.v = have_v ? parse_meta(list_v, "kvtuner.type_v", n_layer) : std::vector<ggml_type>(n_layer, type_v);
    }

    return res;
}

static bool fail(const std::string & msg) {
    g_last_error = msg;
    LLAMA_LOG_ERROR("%s\n", msg.c_str());
    return false;
}

// can `dev` store `type` into the cache (set_rows) and, when fa is set, run flash attention
// with this layer's K/V types and head sizes?
static bool dev_supports(ggml_backend_dev_t dev, const llama_hparams & hp, uint32_t il,
                         ggml_type tk, ggml_type tv, bool fa, std::string & what) {
    ggml_init_params ip = {
        /*.mem_size   =*/ 16*ggml_tensor_overhead(),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        what = "cannot create a probe context";
        return false;
    }

    const int64_t n_kv   = 256;
    const int64_t head_k = hp.n_embd_head_k(il);
    const int64_t head_v = hp.n_embd_head_v(il);
    const int64_t nh_kv  = std::max<int64_t>(1, hp.n_head_kv(il));
    const int64_t nh     = std::max<int64_t>(nh_kv, hp.n_head(il));

    bool ok = true;
    for (int is_v = 0; is_v < 2 && ok; ++is_v) {
        const ggml_type t    = is_v ? tv : tk;
        const int64_t   head = is_v ? head_v : head_k;
        ggml_tensor * cache = ggml_new_tensor_2d(ctx, t, head*nh_kv, n_kv);
        ggml_tensor * src   = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, head*nh_kv, 1);
        ggml_tensor * idx   = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, 1);
        ggml_tensor * op    = ggml_set_rows(ctx, cache, src, idx);
        if (!ggml_backend_dev_supports_op(dev, op)) {
            what = fmt("cannot store a %s cache of type %s", is_v ? "V" : "K", ggml_type_name(t));
            ok = false;
        }
    }

    if (ok && fa) {
        ggml_tensor * q    = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, head_k, 1, nh, 1);
        ggml_tensor * k    = ggml_new_tensor_4d(ctx, tk, head_k, n_kv, nh_kv, 1);
        ggml_tensor * v    = ggml_new_tensor_4d(ctx, tv, head_v, n_kv, nh_kv, 1);
        ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, 1, 1, 1);
        ggml_tensor * op   = ggml_flash_attn_ext(ctx, q, k, v, mask, 1.0f, 0.0f, 0.0f);
        ggml_flash_attn_ext_set_prec(op, GGML_PREC_F32);
        if (!ggml_backend_dev_supports_op(dev, op)) {
            what = fmt("its flash attention cannot run K=%s with V=%s", ggml_type_name(tk), ggml_type_name(tv));
            ok = false;
        }
    }

    ggml_free(ctx);
    return ok;
}

bool llama_kvtuner_check(const llama_model & model, llama_context_params & params) {
    g_last_error.clear();

    llama_kvtuner_types types;
    try {
        types = llama_kvtuner_resolve(model, params.type_k, params.type_v);
    } catch (const std::runtime_error & e) {
        return fail(e.what());
    } catch (const std::exception &) {
        // never a C++ library message (vector::_M_fill_insert, std::bad_alloc) in front of the user
        return fail("kvtuner: the per-layer cache types could not be read (out of memory)");
    }
    if (!types.active()) {
        return true;
    }

    const auto &   hp      = model.hparams;
    const char *   src     = types.source.c_str();
    const uint32_t n_layer = hp.n_layer_all;

    for (uint32_t il = 0; il < n_layer; ++il) {
        if (!hp.has_kv(il)) {
            continue;
        }
        const ggml_type tk = types.k[il];
        const ggml_type tv = types.v[il];
        if (hp.n_embd_head_k(il) % ggml_blck_size(tk) != 0) {
            return fail(fmt("kvtuner (%s): layer %u: K cache type %s has block size %lld, which does not divide the K head size %u",
                        src, il, ggml_type_name(tk), (long long) ggml_blck_size(tk), hp.n_embd_head_k(il)));
        }
        if (hp.n_embd_head_v(il) % ggml_blck_size(tv) != 0) {
            return fail(fmt("kvtuner (%s): layer %u: V cache type %s has block size %lld, which does not divide the V head size %u",
                        src, il, ggml_type_name(tv), (long long) ggml_blck_size(tv), hp.n_embd_head_v(il)));
        }
        if (ggml_is_quantized(tv)) {
            if (params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
                return fail(fmt("kvtuner (%s): layer %u: quantized V cache type %s requires flash attention, which is disabled",
                            src, il, ggml_type_name(tv)));
            }
            if (params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_AUTO) {
                LLAMA_LOG_INFO("%s: enabling flash_attn since layer %u has a quantized V cache (%s)\n", __func__, il, ggml_type_name(tv));
                params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
            }
        }
    }

    // with flash attention on auto, an unsupported combination turns it off later (and the
    // non-flash path then runs any K type); when it is on, the backend must run every layer's pair
    const bool fa = params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_ENABLED;
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (!hp.has_kv(il)) {
            continue;
        }
        ggml_backend_dev_t dev = params.offload_kqv ? model.dev_layer(il) : cpu;
        if (dev == nullptr) {
            dev = cpu;
        }
        std::string what;
        if (!dev_supports(dev, hp, il, types.k[il], types.v[il], fa, what)) {
            return fail(fmt("kvtuner (%s): layer %u: the %s backend %s",
                        src, il, ggml_backend_dev_name(dev), what.c_str()));
        }
    }

    LLAMA_LOG_INFO("%s: per-layer cache types from %s: K = %s, V = %s\n", __func__, src,
            llama_kvtuner_types_str(types.k).c_str(), llama_kvtuner_types_str(types.v).c_str());

    return true;
}

std::string llama_kvtuner_types_str(const std::vector<ggml_type> & types) {
    std::string out;
    for (size_t i = 0; i < types.size();) {
        size_t j = i;
        while (j < types.size() && types[j] == types[i]) {
            j++;
        }
        if (!out.empty()) {
            out += ",";
        }
        out += ggml_type_name(types[i]);
        if (j - i > 1 || types.size() > 1) {
            out += "*" + std::to_string(j - i);
        }
        i = j;
    }
    return out;
}

struct layer_info {
    int32_t type  = -1;
    int64_t bytes = 0;
};

static bool kv_layer_info(const llama_kv_cache * kv, int32_t il, bool is_v, layer_info & out) {
    ggml_type tk;
    ggml_type tv;
    size_t    sk;
    size_t    sv;
    if (kv == nullptr || !kv->get_layer_info(il, tk, tv, sk, sv)) {
        return false;
    }
    if (is_v) {
        out.type  = tv == GGML_TYPE_COUNT ? -1 : (int32_t) tv;
        out.bytes = (int64_t) sv;
    } else {
        out.type  = (int32_t) tk;
        out.bytes = (int64_t) sk;
    }
    return true;
}

static layer_info find_layer(const struct llama_context * ctx, int32_t il, bool is_v) {
    layer_info out;

    llama_memory_t mem = llama_get_memory(ctx);
    if (mem == nullptr) {
        return out;
    }

    if (auto * kv = dynamic_cast<const llama_kv_cache *>(mem)) {
        kv_layer_info(kv, il, is_v, out);
    } else if (auto * iswa = dynamic_cast<const llama_kv_cache_iswa *>(mem)) {
        kv_layer_info(iswa->get_base(), il, is_v, out) || kv_layer_info(iswa->get_swa(), il, is_v, out);
    } else if (auto * hyb = dynamic_cast<const llama_memory_hybrid *>(mem)) {
        kv_layer_info(hyb->get_mem_attn(), il, is_v, out);
    } else if (auto * hyb_iswa = dynamic_cast<const llama_memory_hybrid_iswa *>(mem)) {
        const auto * attn = hyb_iswa->get_mem_attn();
        if (attn) {
            kv_layer_info(attn->get_base(), il, is_v, out) || kv_layer_info(attn->get_swa(), il, is_v, out);
        }
    }

    return out;
}

int32_t llama_kvtuner_layer_type(const struct llama_context * ctx, int32_t il, bool is_v) {
    return find_layer(ctx, il, is_v).type;
}

int64_t llama_kvtuner_layer_bytes(const struct llama_context * ctx, int32_t il, bool is_v) {
    return find_layer(ctx, il, is_v).bytes;
}
