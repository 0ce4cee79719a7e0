// The compiled extension is loaded with torch.ops.load_library (its TORCH_LIBRARY_IMPL blocks register
// the kernels); this stub also makes `import mvpp_kernels._C` a valid, empty Python module.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mvpp compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}

// The vector instruction sets this library was compiled for. The CPU kernels pick their inner loops
// at compile time (-march), so this says which paths run; backend_info() shows it, and the portable
// build test checks that a baseline build really takes the generic paths.
__attribute__((visibility("default"))) const char* mvpp_compiled_isa(void) {
  return
#if defined(__x86_64__) || defined(_M_X64)
      "x86-64"
#elif defined(__aarch64__)
      "aarch64"
#else
      "other"
#endif
#if defined(__SSE4_2__)
         " sse4.2"
#endif
#if defined(__AVX__)
         " avx"
#endif
#if defined(__AVX2__)
         " avx2"
#endif
#if defined(__FMA__)
         " fma"
#endif
#if defined(__AVX512F__)
         " avx512f"
#endif
#if defined(__AVX512BW__)
         " avx512bw"
#endif
#if defined(__AVX512VL__)
         " avx512vl"
#endif
#if defined(__AVX512BF16__)
         " avx512bf16"
#endif
      ;
}
}
