// cuBLASLt for the extension's GEMM handlers (quant_fp8_gemm.cu, invariant_gemm.cu): the entry
// points, resolved once from libcublasLt.so.13 with dlopen (XLA has loaded it by then; its handle
// is shared), so the extension links no cuBLAS; a cuBLASLt handle per device; and an owner that
// destroys a descriptor on every path out of a handler.
#pragma once

#include <cublasLt.h>
#include <dlfcn.h>

#include <map>
#include <mutex>
#include <string>

namespace pagedjax {
namespace lt {

// The cuBLASLt entry points we call, resolved from the shared library.
struct CublasLt {
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtGetVersion) get_version = nullptr;
  decltype(&cublasLtGetStatusString) status_string = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
  decltype(&cublasLtMatmulAlgoCheck) algo_check = nullptr;
  decltype(&cublasLtMatmulAlgoConfigSetAttribute) algo_config_set = nullptr;
  decltype(&cublasLtMatmulAlgoConfigGetAttribute) algo_config_get = nullptr;
  std::string error;  // why loading failed; empty when every pointer is set
};

template <typename F>
inline bool Resolve(void* lib, const char* name, F* out, std::string* error) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  if (*out == nullptr && error->empty()) *error = std::string("libcublasLt has no symbol ") + name;
  return *out != nullptr;
}

inline const CublasLt& Lt() {
  static const CublasLt lt = [] {
    CublasLt l;
    const char* name = "libcublasLt.so.13";
    void* lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD);  // XLA's copy, when it has one loaded
    if (lib == nullptr) lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr) {
      const char* why = dlerror();
      l.error = std::string("cannot load ") + name + " (installed with jax[cuda13]): " + (why ? why : "?");
      return l;
    }
    Resolve(lib, "cublasLtCreate", &l.create, &l.error);
    Resolve(lib, "cublasLtGetVersion", &l.get_version, &l.error);
    Resolve(lib, "cublasLtGetStatusString", &l.status_string, &l.error);
    Resolve(lib, "cublasLtMatmulDescCreate", &l.desc_create, &l.error);
    Resolve(lib, "cublasLtMatmulDescDestroy", &l.desc_destroy, &l.error);
    Resolve(lib, "cublasLtMatmulDescSetAttribute", &l.desc_set, &l.error);
    Resolve(lib, "cublasLtMatrixLayoutCreate", &l.layout_create, &l.error);
    Resolve(lib, "cublasLtMatrixLayoutDestroy", &l.layout_destroy, &l.error);
    Resolve(lib, "cublasLtMatmulPreferenceCreate", &l.pref_create, &l.error);
    Resolve(lib, "cublasLtMatmulPreferenceDestroy", &l.pref_destroy, &l.error);
    Resolve(lib, "cublasLtMatmulPreferenceSetAttribute", &l.pref_set, &l.error);
    Resolve(lib, "cublasLtMatmulAlgoGetHeuristic", &l.heuristic, &l.error);
    Resolve(lib, "cublasLtMatmul", &l.matmul, &l.error);
    Resolve(lib, "cublasLtMatmulAlgoCheck", &l.algo_check, &l.error);
    Resolve(lib, "cublasLtMatmulAlgoConfigSetAttribute", &l.algo_config_set, &l.error);
    Resolve(lib, "cublasLtMatmulAlgoConfigGetAttribute", &l.algo_config_get, &l.error);
    return l;
  }();
  return lt;
}

// The cuBLASLt handle of `device`, created on first use and kept (one per device, shared by the
// handlers). On failure, cuBLASLt's status and no handle.
inline cublasStatus_t DeviceHandle(const CublasLt& lt, int device, cublasLtHandle_t* out) {
  static std::mutex mu;
  static std::map<int, cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasLtHandle_t h = nullptr;
    if (cublasStatus_t st = lt.create(&h); st != CUBLAS_STATUS_SUCCESS) return st;
    it = handles.emplace(device, h).first;
  }
  *out = it->second;
  return CUBLAS_STATUS_SUCCESS;
}

// Destroys cuBLASLt descriptors on every path out of the handler.
template <typename T, typename D>
struct Owned {
  T value = nullptr;
  D destroy = nullptr;
  Owned(T v, D d) : value(v), destroy(d) {}
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  void reset() {
    if (value != nullptr) destroy(value);
    value = nullptr;
  }
  ~Owned() { reset(); }
};

}  // namespace lt
}  // namespace pagedjax
