# Sourced by the scripts/gpu_*.sh drivers: build_test_backend_ops compiles ggml's test-backend-ops
# from the carried source with patches/ applied, linked against the engine installed in /tmp/site,
# into /root/test-backend-ops (once per warm machine; prints the compile time to $OUT/tbo.txt).
build_test_backend_ops() {
  [ -x /root/test-backend-ops ] && return 0
  local src=/root/tbo-src
  rm -rf "$src" && mkdir -p "$src"
  python3 -c "
import sys, pathlib; sys.path.insert(0, 'native'); import build
top = build.unpack(pathlib.Path('.carry/llama-src.tar.xz'), pathlib.Path('$src'))
build.apply_patches(top / 'vendor' / 'llama.cpp'); print(top)" > /tmp/src.txt || return 1
  local ll lib t0
  ll=$(tail -n 1 /tmp/src.txt)/vendor/llama.cpp
  lib=/tmp/site/llama_cpp/lib
  t0=$(date +%s)
  g++ -O1 -std=c++17 -I"$ll/ggml/include" "$ll/tests/test-backend-ops.cpp" -L"$lib" -lggml -lggml-base \
      -Wl,-rpath,"$lib" -o /root/test-backend-ops -lpthread || return 1
  echo "test-backend-ops compiled in $(( $(date +%s) - t0 )) s" | tee "$OUT/tbo.txt"
}
