// fastdd._C Python module: the only translation unit with pybind11; it exposes build_info() alone.
#include <torch/extension.h>
#include <torch/version.h>

namespace {
py::dict build_info() {
  py::dict info;
  info["torch_version"] = TORCH_VERSION;
#ifdef WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = __VERSION__;
  return info;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "How fastdd._C was built (torch version, CUDA, OpenMP, compiler).");
}
