// The compiled extension is loaded with torch.ops.load_library (its TORCH_LIBRARY_IMPL blocks register
// the kernels); this stub also makes `import mvpp_kernels._C` a valid, empty Python module.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mvpp compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
