// SPDX-License-Identifier: Apache-2.0
// epcomm._epcomm: the nanobind binding of the C++ API (include/epcomm/). It converts DLPack
// tensors and CUDA stream handles and calls the C++ library; every check and every error comes
// from C++, so C++ and Python users see the same behaviour. No torch at build time: inputs are
// any object with __dlpack__ (torch, CuPy, JAX, NumPy), results are DLPack views into the
// symmetric buffer or the handle, which they keep alive.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "epcomm/epcomm.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using epcomm::ErrorCode;
// Inputs: any DLPack tensor on any device, checked here and never copied. Imported as read-only
// (nb::ro): the binding only takes its address, and read-only producers (JAX) are accepted.
using Array = nb::ndarray<nb::ro>;
using ViewArray = nb::ndarray<>;  // the views handed back to Python
using OptArray = std::optional<Array>;

// --- Exceptions: one Python class per ErrorCode -----------------------------------------------

constexpr int kNumCodes = static_cast<int>(ErrorCode::kBroken) + 1;
PyObject* g_error = nullptr;                // epcomm.Error
PyObject* g_error_by_code[kNumCodes] = {};  // indexed by ErrorCode

struct ErrorClassSpec {
  ErrorCode code;
  const char* name;
  PyObject* extra_base;  // a builtin class the Python class also derives from, or nullptr
  const char* doc;
};

void createErrorClasses(nb::module_& m) {
  g_error = PyErr_NewExceptionWithDoc(
      "epcomm.Error",
      "Base of every epcomm error (the C++ epcomm::Error). Attributes: code (ErrorCode), rank "
      "(the rank that raised it, -1 if unknown), message.",
      PyExc_RuntimeError, nullptr);
  m.attr("Error") = nb::handle(g_error);
  const ErrorClassSpec specs[] = {
      {ErrorCode::kInternal, "InternalError", nullptr, "A bug in epcomm or a broken invariant."},
      {ErrorCode::kCuda, "CudaError", nullptr,
       "CUDA runtime API failure; .status is the cudaError_t value."},
      {ErrorCode::kDriver, "DriverError", nullptr,
       "CUDA driver API failure; .status is the CUresult value."},
      {ErrorCode::kMpi, "MpiError", nullptr, "MPI failure; .status is the MPI error code."},
      {ErrorCode::kSystem, "SystemError", nullptr,
       "Operating-system call failure, or a bootstrap callback that raised (then __cause__)."},
      {ErrorCode::kTimeout, "TimeoutError", PyExc_TimeoutError,
       "A deadline expired; .peer is the rank that never answered (-1 if unknown)."},
      {ErrorCode::kInvalidArgument, "InvalidArgument", PyExc_ValueError, "Bad input."},
      {ErrorCode::kUnsupported, "UnsupportedError", nullptr,
       "The machine cannot do what was asked (at buffer creation)."},
      {ErrorCode::kRemote, "RemoteError", nullptr,
       "Another rank failed and this rank stopped instead of waiting."},
      {ErrorCode::kBroken, "BrokenError", nullptr,
       "The buffer is unusable after an earlier error: destroy and recreate it."},
  };
  for (const ErrorClassSpec& spec : specs) {
    nb::object bases = spec.extra_base
                           ? nb::make_tuple(nb::handle(g_error), nb::handle(spec.extra_base))
                           : nb::borrow(g_error);
    const std::string qualified = std::string("epcomm.") + spec.name;
    PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), spec.doc, bases.ptr(), nullptr);
    if (!cls) throw nb::python_error();
    g_error_by_code[static_cast<int>(spec.code)] = cls;
    m.attr(spec.name) = nb::handle(cls);
  }
}

// The rank from the message prefix every epcomm error carries ("[epcomm rank 3] ...").
int rankFromMessage(const char* message) {
  static const char kPrefix[] = "[epcomm rank ";
  if (std::strncmp(message, kPrefix, sizeof(kPrefix) - 1) != 0) return -1;
  return std::atoi(message + sizeof(kPrefix) - 1);
}

// A Python exception raised inside a bootstrap callback, kept to become the __cause__ of the
// epcomm error the C++ library throws for it. One per thread: callbacks run on the calling one.
// A raw pointer: a thread_local object must not decref at thread exit without the GIL.
thread_local PyObject* t_callback_cause = nullptr;

void raiseError(const epcomm::Error& error) {
  const int code = static_cast<int>(error.code());
  PyObject* cls =
      (code > 0 && code < kNumCodes && g_error_by_code[code]) ? g_error_by_code[code] : g_error;
  nb::object exc = nb::steal(PyObject_CallFunction(cls, "s", error.what()));
  if (!exc.is_valid()) return;  // the constructor raised; that error stays set
  exc.attr("code") = nb::cast(error.code());
  exc.attr("rank") = rankFromMessage(error.what());
  exc.attr("message") = error.what();
  if (auto* e = dynamic_cast<const epcomm::TimeoutError*>(&error)) exc.attr("peer") = e->peer();
  if (auto* e = dynamic_cast<const epcomm::CudaError*>(&error)) exc.attr("status") = e->status();
  if (auto* e = dynamic_cast<const epcomm::DriverError*>(&error)) exc.attr("status") = e->status();
  if (auto* e = dynamic_cast<const epcomm::MpiError*>(&error)) exc.attr("status") = e->status();
  if (auto* e = dynamic_cast<const epcomm::SystemError*>(&error)) {
    exc.attr("errno") = e->errnoValue();
  }
  if (t_callback_cause) {
    PyException_SetCause(exc.ptr(), t_callback_cause);  // steals the reference
    t_callback_cause = nullptr;
  }
  PyErr_SetObject(cls, exc.ptr());
}

[[noreturn]] void throwInvalid(const std::string& what) {
  throw epcomm::InvalidArgument("[epcomm] " + what);
}

// --- Tensors ----------------------------------------------------------------------------------

namespace dt {
constexpr nb::dlpack::dtype kBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
// kDLFloat8_e4m3fn in DLPack >= 1.1 (written as a number: older nanobind lacks the name).
constexpr nb::dlpack::dtype kF8E4M3{10, 8, 1};
constexpr nb::dlpack::dtype kU8{static_cast<uint8_t>(nb::dlpack::dtype_code::UInt), 8, 1};
constexpr nb::dlpack::dtype kI8{static_cast<uint8_t>(nb::dlpack::dtype_code::Int), 8, 1};
constexpr nb::dlpack::dtype kF32{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 32, 1};
constexpr nb::dlpack::dtype kI32{static_cast<uint8_t>(nb::dlpack::dtype_code::Int), 32, 1};
constexpr nb::dlpack::dtype kI64{static_cast<uint8_t>(nb::dlpack::dtype_code::Int), 64, 1};
constexpr nb::dlpack::dtype kBool{static_cast<uint8_t>(nb::dlpack::dtype_code::Bool), 8, 1};
}  // namespace dt

bool sameDtype(nb::dlpack::dtype a, nb::dlpack::dtype b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

std::string dtypeName(nb::dlpack::dtype d) {
  using C = nb::dlpack::dtype_code;
  std::string base;
  switch (static_cast<C>(d.code)) {
    case C::Int:
      base = "int";
      break;
    case C::UInt:
      base = "uint";
      break;
    case C::Float:
      base = "float";
      break;
    case C::Bfloat:
      base = "bfloat";
      break;
    case C::Bool:
      return "bool";
    case C::Complex:
      base = "complex";
      break;
    default:
      if (d.code == 10 && d.bits == 8) return "float8_e4m3fn";
      if (d.code == 12 && d.bits == 8) return "float8_e5m2";
      base = "dtype_code" + std::to_string(d.code) + "_";
      break;
  }
  return base + std::to_string(d.bits) + (d.lanes != 1 ? "x" + std::to_string(d.lanes) : "");
}

std::string deviceName(int device_type) {
  switch (device_type) {
    case nb::device::cpu::value:
      return "cpu";
    case nb::device::cuda::value:
      return "cuda";
    case nb::device::cuda_host::value:
      return "cuda_host";
    case nb::device::cuda_managed::value:
      return "cuda_managed";
    default:
      return "device type " + std::to_string(device_type);
  }
}

std::string shapeText(const Array& a) {
  std::string s = "[";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

// True when `a` is row-major contiguous (strides as DLPack gives them, in elements).
bool isRowMajor(const Array& a) {
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected) return false;
    expected *= static_cast<int64_t>(a.shape(i));
  }
  return true;
}

// Checks device, dtype, rank (ndim) and contiguity of a tensor argument; returns its address.
// CUDA device memory only: epcomm's kernels run on the GPU and read it directly.
void* devicePtr(const Array& a, const char* name, int device, int ndim,
                std::initializer_list<nb::dlpack::dtype> dtypes, bool row_major = true) {
  if (a.device_type() != nb::device::cuda::value) {
    throwInvalid(std::string(name) + ": expected a CUDA device tensor, got a " +
                 deviceName(a.device_type()) + " array of shape " + shapeText(a) +
                 "; epcomm's kernels read GPU memory (move it to " +
                 (device >= 0 ? "cuda:" + std::to_string(device) : std::string("the GPU")) +
                 " first)");
  }
  if (device >= 0 && a.device_id() != device) {
    throwInvalid(std::string(name) + ": tensor is on cuda:" + std::to_string(a.device_id()) +
                 " but the buffer uses cuda:" + std::to_string(device));
  }
  bool ok = dtypes.size() == 0;
  std::string allowed;
  for (nb::dlpack::dtype d : dtypes) {
    ok = ok || sameDtype(a.dtype(), d);
    allowed += (allowed.empty() ? "" : " or ") + dtypeName(d);
  }
  if (!ok)
    throwInvalid(std::string(name) + ": dtype " + dtypeName(a.dtype()) + ", expected " + allowed);
  if (ndim >= 0 && static_cast<int>(a.ndim()) != ndim) {
    throwInvalid(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got " +
                 shapeText(a));
  }
  if (row_major && !isRowMajor(a)) {
    throwInvalid(std::string(name) + ": must be contiguous (row-major), got shape " + shapeText(a) +
                 " with other strides (call .contiguous() first)");
  }
  return static_cast<char*>(a.data_handle()) + a.byte_offset();
}

void checkDim(const Array& a, const char* name, size_t dim, int64_t expected, const char* what) {
  if (static_cast<int64_t>(a.shape(dim)) != expected) {
    throwInvalid(std::string(name) + ": dimension " + std::to_string(dim) + " is " +
                 std::to_string(a.shape(dim)) + ", expected " + std::to_string(expected) + " (" +
                 what + ")");
  }
}

epcomm::IndexType indexType(const Array& a) {
  return sameDtype(a.dtype(), dt::kI32) ? epcomm::IndexType::kInt32 : epcomm::IndexType::kInt64;
}

// torch's own DLPack converters (torch._C._to_dlpack / _from_dlpack), looked up once torch is
// imported. nanobind imports a torch tensor through Tensor.__dlpack__ (Python code: checks,
// stream arguments) and exports through torch.utils.dlpack.from_dlpack (Python code that makes
// a torch.cuda.Stream from a device string for every CUDA view); the C functions under both do
// the conversion itself in a fraction of the host time. Exact torch.Tensor only: a subclass may
// override __dlpack__ or __torch_function__, so it takes nanobind's general path.
struct TorchDlpack {
  PyTypeObject* tensor = nullptr;     // torch.Tensor
  PyObject* to_dlpack = nullptr;      // torch._C._to_dlpack(tensor) -> capsule
  PyObject* from_dlpack = nullptr;    // torch._C._from_dlpack(capsule) -> tensor
  PyObject* requires_grad = nullptr;  // interned "requires_grad"
};

// nullptr until torch is imported (looked up again on the next call: one dict lookup), or when
// this torch lacks the functions. Raw references, never released (module lifetime).
const TorchDlpack* torchDlpack() {
  static TorchDlpack api;
  static bool resolved = false;
  if (resolved) return api.tensor ? &api : nullptr;
  PyObject* torch = PyDict_GetItemString(PyImport_GetModuleDict(), "torch");  // borrowed
  if (!torch) return nullptr;
  PyObject* tensor = PyObject_GetAttrString(torch, "Tensor");
  if (!tensor) {  // torch is being imported right now: try again later
    PyErr_Clear();
    return nullptr;
  }
  resolved = true;
  PyObject* c = PyObject_GetAttrString(torch, "_C");
  PyObject* to = c ? PyObject_GetAttrString(c, "_to_dlpack") : nullptr;
  PyObject* from = c ? PyObject_GetAttrString(c, "_from_dlpack") : nullptr;
  PyErr_Clear();
  Py_XDECREF(c);
  if (!PyType_Check(tensor) || !to || !from) {
    Py_DECREF(tensor);
    Py_XDECREF(to);
    Py_XDECREF(from);
    return nullptr;
  }
  api.tensor = reinterpret_cast<PyTypeObject*>(tensor);
  api.to_dlpack = to;
  api.from_dlpack = from;
  api.requires_grad = PyUnicode_InternFromString("requires_grad");
  return &api;
}

// Imports `obj` through torch._C._to_dlpack when it is a plain torch.Tensor; false (and no
// Python error set) when it is not, or when torch refuses (then nanobind's path gives the error).
bool importTorch(nb::handle obj, Array& out) {
  const TorchDlpack* t = torchDlpack();
  if (!t || Py_TYPE(obj.ptr()) != t->tensor) return false;
  // Tensor.__dlpack__ refuses a tensor that requires grad; leave those to it (same error).
  PyObject* grad = PyObject_GetAttr(obj.ptr(), t->requires_grad);
  if (!grad) {
    PyErr_Clear();
    return false;
  }
  const bool requires_grad = grad == Py_True;
  Py_DECREF(grad);
  if (requires_grad) return false;
  nb::object capsule = nb::steal(PyObject_CallOneArg(t->to_dlpack, obj.ptr()));
  if (!capsule.is_valid()) {
    PyErr_Clear();
    return false;
  }
  return nb::try_cast(capsule, out);
}

// What result arrays are returned as. kAuto: the framework of the call's main input.
enum class Framework { kAuto = -1, kDlpack = 0, kNumpy = 1, kTorch = 2, kJax = 4, kCupy = 5 };

Framework frameworkOf(nb::handle obj) {
  static std::unordered_map<PyTypeObject*, Framework> cache;
  PyTypeObject* type = Py_TYPE(obj.ptr());
  auto it = cache.find(type);
  if (it != cache.end()) return it->second;
  Framework f = Framework::kDlpack;
  nb::object module =
      nb::getattr(nb::handle(reinterpret_cast<PyObject*>(type)), "__module__", nb::none());
  if (nb::isinstance<nb::str>(module)) {
    std::string name = nb::cast<std::string>(module);
    std::string top = name.substr(0, name.find('.'));
    if (top == "torch")
      f = Framework::kTorch;
    else if (top == "cupy")
      f = Framework::kCupy;
    else if (top == "jax" || top == "jaxlib")
      f = Framework::kJax;
    else if (top == "numpy")
      f = Framework::kNumpy;
  }
  cache.emplace(type, f);
  return f;
}

// A view of device memory owned by `owner` (kept alive by the view), in framework `fw`.
nb::object view(const void* data, std::initializer_list<size_t> shape, nb::dlpack::dtype dtype,
                int device, nb::handle owner, Framework fw,
                int device_type = nb::device::cuda::value) {
  ViewArray a(const_cast<void*>(data), shape, owner, {}, dtype, device_type, device);
  switch (fw) {
    case Framework::kTorch:
      if (const TorchDlpack* t = torchDlpack()) {
        // A plain DLPack capsule (nb::ndarray<> exports one) straight into torch.
        nb::object capsule = nb::cast(a, nb::rv_policy::reference);
        PyObject* tensor = PyObject_CallOneArg(t->from_dlpack, capsule.ptr());
        if (!tensor) throw nb::python_error();
        return nb::steal(tensor);
      }
      return nb::cast(nb::ndarray<nb::pytorch>(a), nb::rv_policy::reference);
    case Framework::kCupy:
      return nb::cast(nb::ndarray<nb::cupy>(a), nb::rv_policy::reference);
    case Framework::kJax:
      return nb::cast(nb::ndarray<nb::jax>(a), nb::rv_policy::reference);
    case Framework::kNumpy:
      return nb::cast(nb::ndarray<nb::numpy>(a), nb::rv_policy::reference);
    // array_api: an nb_ndarray object with __dlpack__/__dlpack_device__, usable many times.
    default:
      return nb::cast(nb::ndarray<nb::array_api>(a), nb::rv_policy::reference);
  }
}

Framework parseFramework(const std::string& name) {
  if (name == "auto") return Framework::kAuto;
  if (name == "dlpack") return Framework::kDlpack;
  if (name == "torch") return Framework::kTorch;
  if (name == "cupy") return Framework::kCupy;
  if (name == "jax") return Framework::kJax;
  if (name == "numpy") return Framework::kNumpy;
  throwInvalid("framework: '" + name + "', expected auto, dlpack, torch, cupy, jax or numpy");
}

// --- Streams ----------------------------------------------------------------------------------

// Python callable returning the default stream handle (int). A raw, never released reference: a
// global object would decref after the interpreter is gone.
PyObject* g_current_stream_fn = nullptr;

uintptr_t intHandle(nb::handle value, const char* what) {
  if (!nb::isinstance<nb::int_>(value))
    throwInvalid(std::string("stream: ") + what + " is not an int");
  return static_cast<uintptr_t>(PyLong_AsUnsignedLongLongMask(value.ptr()));
}

// None: the current stream of torch (when torch is loaded), else the legacy default stream 0.
// An int is a cudaStream_t. torch.cuda.Stream (.cuda_stream), CuPy (.ptr) and objects with the
// __cuda_stream__ protocol (returns (version, handle)) work too.
cudaStream_t toStream(nb::handle stream) {
  if (stream.is_none()) {
    if (!g_current_stream_fn) return nullptr;
    nb::object handle = nb::handle(g_current_stream_fn)();
    return reinterpret_cast<cudaStream_t>(intHandle(handle, "the current stream"));
  }
  if (nb::isinstance<nb::int_>(stream)) {
    return reinterpret_cast<cudaStream_t>(intHandle(stream, "handle"));
  }
  if (nb::hasattr(stream, "cuda_stream")) {
    return reinterpret_cast<cudaStream_t>(intHandle(stream.attr("cuda_stream"), ".cuda_stream"));
  }
  if (nb::hasattr(stream, "__cuda_stream__")) {
    nb::object pair = stream.attr("__cuda_stream__")();
    return reinterpret_cast<cudaStream_t>(intHandle(pair[1], "__cuda_stream__()[1]"));
  }
  if (nb::hasattr(stream, "ptr")) {
    return reinterpret_cast<cudaStream_t>(intHandle(stream.attr("ptr"), ".ptr"));
  }
  throwInvalid(
      "stream: expected None, an int (cudaStream_t), a torch.cuda.Stream or an object "
      "with __cuda_stream__, got " +
      nb::cast<std::string>(
          nb::str(nb::handle(reinterpret_cast<PyObject*>(Py_TYPE(stream.ptr()))))));
}

int optInt(const std::optional<int>& v) {
  return v ? *v : epcomm::kAuto;
}

// --- Bootstrap ---------------------------------------------------------------------------------

// A Python callable shared by the C++ callbacks; released with the GIL held.
struct PyCallable {
  nb::object fn;
  ~PyCallable() {
    if (fn.is_valid() && Py_IsInitialized()) {
      nb::gil_scoped_acquire gil;
      fn.reset();
    } else {
      fn.release();  // interpreter gone: leak rather than touch it
    }
  }
};

// Runs a Python callback from C++ (GIL released around the collective that calls it). A Python
// exception becomes an epcomm::SystemError naming the callback, with the Python exception as its
// __cause__ once it reaches Python again.
template <typename F>
void callPython(const char* what, F&& body) {
  nb::gil_scoped_acquire gil;
  try {
    body();
  } catch (nb::python_error& e) {
    std::string message = std::string("[epcomm] bootstrap ") + what + " callback raised " +
                          nb::cast<std::string>(nb::str(e.type().attr("__name__"))) + ": " +
                          nb::cast<std::string>(nb::str(e.value()));
    Py_XDECREF(t_callback_cause);  // a cause never raised (the library handled that error)
    t_callback_cause = nb::borrow(e.value()).release().ptr();
    throw epcomm::SystemError(0, message);
  }
}

struct Callbacks {
  epcomm::CallbackBootstrap::AllGatherFn all_gather;
  epcomm::CallbackBootstrap::BarrierFn barrier;
};

// all_gather(data: bytes) -> bytes (size * len(data), rank order) or a list of one bytes-like
// per rank; barrier() -> None, or None for an all-gather of one byte.
Callbacks makeCallbacks(int size, nb::object all_gather, nb::object barrier) {
  auto gather_fn = std::make_shared<PyCallable>(PyCallable{std::move(all_gather)});
  epcomm::CallbackBootstrap::AllGatherFn ag = [gather_fn, size](const void* send, void* recv,
                                                                size_t bytes) {
    callPython("all_gather", [&] {
      nb::bytes mine(static_cast<const char*>(send), bytes);
      nb::object out = gather_fn->fn(mine);
      const size_t total = bytes * static_cast<size_t>(size);
      if (nb::isinstance<nb::list>(out) || nb::isinstance<nb::tuple>(out)) {
        if (nb::len(out) != static_cast<size_t>(size)) {
          throwInvalid("bootstrap all_gather returned " + std::to_string(nb::len(out)) +
                       " parts, expected one per rank (" + std::to_string(size) + ")");
        }
        size_t r = 0;
        for (nb::handle part : out) {
          Py_buffer view;
          if (PyObject_GetBuffer(part.ptr(), &view, PyBUF_SIMPLE) != 0) throw nb::python_error();
          const size_t got = static_cast<size_t>(view.len);
          if (got == bytes) std::memcpy(static_cast<char*>(recv) + r * bytes, view.buf, bytes);
          PyBuffer_Release(&view);
          if (got != bytes) {
            throwInvalid("bootstrap all_gather part " + std::to_string(r) + " has " +
                         std::to_string(got) + " bytes, expected " + std::to_string(bytes));
          }
          ++r;
        }
        return;
      }
      Py_buffer view;
      if (PyObject_GetBuffer(out.ptr(), &view, PyBUF_SIMPLE) != 0) throw nb::python_error();
      const size_t got = static_cast<size_t>(view.len);
      if (got == total) std::memcpy(recv, view.buf, total);
      PyBuffer_Release(&view);
      if (got != total) {
        throwInvalid("bootstrap all_gather returned " + std::to_string(got) + " bytes, expected " +
                     std::to_string(total) + " (" + std::to_string(bytes) + " per rank x " +
                     std::to_string(size) + " ranks, in rank order)");
      }
    });
  };
  epcomm::CallbackBootstrap::BarrierFn bar;
  if (!barrier.is_none()) {
    auto barrier_fn = std::make_shared<PyCallable>(PyCallable{std::move(barrier)});
    bar = [barrier_fn] { callPython("barrier", [&] { barrier_fn->fn(); }); };
  }
  return Callbacks{std::move(ag), std::move(bar)};
}

// --- Buffer, handles, results -------------------------------------------------------------------

struct PyBuffer;

struct PyHandle {
  epcomm::EpHandle handle;
  nb::object buffer;  // the PyBuffer it belongs to (kept alive while the handle lives)
  PyBuffer* owner;
};

// One result array, made into a DLPack view the first time Python reads it: a call pays only for
// the views its caller uses (a framework view costs microseconds: torch.from_dlpack).
struct LazyView {
  const void* data = nullptr;
  size_t shape[3] = {0, 0, 0};
  int ndim = 0;
  nb::dlpack::dtype dtype{};
  bool from_handle = false;  // owned by the handle (else by the buffer)
  nb::object cached;

  void set(const void* p, std::initializer_list<size_t> dims, nb::dlpack::dtype d,
           bool handle_owned = false) {
    data = p;
    ndim = 0;
    for (size_t v : dims) shape[ndim++] = v;
    dtype = d;
    from_handle = handle_owned;
  }
};

// Views into the symmetric buffer, remembered per buffer and handed out again when a later result
// has a view of the same memory, shape, dtype and framework (the LL outputs, combine_input and
// the capacity-sized HT views are the same every call) while the earlier view is still alive. A
// framework view costs microseconds (torch.from_dlpack), a lookup here a few nanoseconds.
// Weak references: a view holds its buffer (inside the framework's DLPack deleter, where Python's
// cycle collector cannot see it), so a strong cache would keep every buffer alive for ever.
struct ViewCache {
  struct Entry {
    const void* data;
    size_t shape[3];
    int ndim;
    uint8_t code, bits;
    Framework fw;
    nb::weakref view;
  };
  static constexpr size_t kMaxEntries = 32;  // a few per op; exact-count row counts vary
  std::vector<Entry> entries;

  // The live view of this memory, shape, dtype and framework, or an invalid object.
  nb::object find(const void* data, const size_t* shape, int ndim, nb::dlpack::dtype d,
                  Framework fw) {
    for (size_t i = 0; i < entries.size(); ++i) {
      Entry& e = entries[i];
      if (e.data == data && e.ndim == ndim && e.code == d.code && e.bits == d.bits && e.fw == fw &&
          std::equal(shape, shape + ndim, e.shape)) {
        nb::object v = e.view();
        if (!v.is_none()) return v;
        entries.erase(entries.begin() + static_cast<std::ptrdiff_t>(i));  // it died
        return nb::object();
      }
    }
    return nb::object();
  }
  void add(const void* data, const size_t* shape, int ndim, nb::dlpack::dtype d, Framework fw,
           nb::handle v) {
    PyObject* ref = PyWeakref_NewRef(v.ptr(), nullptr);
    if (!ref) {  // a type without weak references (nanobind's own ndarray): not cached
      PyErr_Clear();
      return;
    }
    if (entries.size() >= kMaxEntries) entries.clear();
    Entry e{data, {0, 0, 0}, ndim, d.code, d.bits, fw, nb::steal<nb::weakref>(ref)};
    std::copy(shape, shape + ndim, e.shape);
    entries.push_back(std::move(e));
  }
};

struct ResultBase {
  nb::object buffer;  // keep the memory the views point into alive
  nb::object handle;
  int device = 0;
  Framework framework = Framework::kDlpack;
  ViewCache* cache = nullptr;  // the buffer's, for buffer-owned views

  nb::object get(LazyView& v) {
    if (!v.data) return nb::none();
    if (!v.cached.is_valid() && sameDtype(v.dtype, dt::kF8E4M3)) {
      try {
        return make(v);
      } catch (nb::python_error&) {
        // A framework too old to import DLPack's float8_e4m3fn: return the bytes as uint8.
        v.dtype = dt::kU8;
      }
    }
    return make(v);
  }

  nb::object make(LazyView& v) {
    const bool shared = cache != nullptr && !v.from_handle;
    if (!v.cached.is_valid() && shared) {
      nb::object hit = cache->find(v.data, v.shape, v.ndim, v.dtype, framework);
      if (hit.is_valid()) {
        v.cached = std::move(hit);
        return v.cached;
      }
    }
    if (!v.cached.is_valid()) {
      nb::handle owner = v.from_handle ? handle : buffer;
      switch (v.ndim) {
        case 1:
          v.cached = view(v.data, {v.shape[0]}, v.dtype, device, owner, framework);
          break;
        case 2:
          v.cached = view(v.data, {v.shape[0], v.shape[1]}, v.dtype, device, owner, framework);
          break;
        default:
          v.cached =
              view(v.data, {v.shape[0], v.shape[1], v.shape[2]}, v.dtype, device, owner, framework);
      }
      if (shared) cache->add(v.data, v.shape, v.ndim, v.dtype, framework, v.cached);
    }
    return v.cached;
  }
};

struct DispatchOutput : ResultBase {
  LazyView recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx;
  LazyView num_recv_tokens, recv_rank_prefix, num_recv_tokens_per_expert, combine_input;
  LazyView expert_offsets;  // expert_major only
  std::optional<int64_t> num_recv_tokens_host;
  // Host copy of the aligned per-local-expert counts (exact_count only), else None.
  std::optional<std::vector<int32_t>> num_recv_tokens_per_expert_list;
  int64_t capacity = 0;
};

struct LlDispatchOutput : ResultBase {
  LazyView recv_x, recv_x_scales, num_recv_tokens_per_expert, recv_src_info;
  int64_t rows_per_expert = 0;
};

struct PyBuffer {
  std::unique_ptr<epcomm::EpBuffer> buffer;
  nb::object bootstrap;  // the Python Bootstrap object, which must outlive the buffer
  Framework framework = Framework::kAuto;
  int last_ll_num_tokens = 0;
  // Framework of the last LL dispatch's x: a receive half (x=None) returns views in it.
  Framework last_ll_framework = Framework::kDlpack;
  ViewCache views;

  epcomm::EpBuffer& get() const {
    if (!buffer) {
      throw epcomm::Error(
          ErrorCode::kBroken,
          "[epcomm] this Buffer was destroyed (Buffer.destroy()); create a new one");
    }
    return *buffer;
  }
  Framework fw(nb::handle input) const {
    return framework == Framework::kAuto ? frameworkOf(input) : framework;
  }
  void destroy() {
    if (!buffer) return;
    views.entries.clear();           // views of freed memory must not be handed out again
    nb::gil_scoped_release release;  // collective: waits for the peers
    buffer.reset();
  }
  ~PyBuffer() {
    if (buffer) destroy();
  }
};

const epcomm::EpHandle& handleOf(const PyHandle& h, const PyBuffer& b) {
  if (h.owner != &b) throwInvalid("handle: belongs to another Buffer");
  return h.handle;
}

template <typename T>
nb::object pyself(T* p) {
  return nb::find(p);
}

epcomm::TopkView topkView(const OptArray& topk_idx, const PyBuffer& b, int num_tokens,
                          const char* name = "topk_idx") {
  epcomm::TopkView view;
  if (!topk_idx) return view;
  const Array& a = *topk_idx;
  view.idx = devicePtr(a, name, b.get().device(), 2, {dt::kI64, dt::kI32});
  view.idx_type = indexType(a);
  view.num_tokens = static_cast<int>(a.shape(0));
  view.num_topk = static_cast<int>(a.shape(1));
  if (num_tokens >= 0) checkDim(a, name, 0, num_tokens, "one row per token of x");
  return view;
}

Array asArray(nb::handle obj, const char* name) {
  Array a;
  if (importTorch(obj, a)) return a;
  if (!nb::try_cast(obj, a)) {
    throwInvalid(std::string(name) +
                 ": expected a tensor with __dlpack__ (torch, CuPy, JAX), got " +
                 nb::cast<std::string>(
                     nb::str(nb::handle(reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr()))))));
  }
  return a;
}

// An optional tensor argument (None: not given), converted like asArray. The binding takes these
// as Python objects and converts them here, inside the call's argument checks, so a bad one is
// rejected on every rank (rejectCollective) and torch tensors take the fast path.
OptArray optArray(nb::handle obj, const char* name) {
  if (obj.is_none()) return std::nullopt;
  return asArray(obj, name);
}

// Bad input found by the binding while converting the arguments of a collective call. The call
// still takes its place in every rank's sequence of calls (buffer.hpp, "Errors"): the binding
// makes the library a call it always rejects, so the library skips the call on every rank, tells
// the peers (they get RemoteError) and the buffer stays usable. Then the binding raises its own
// message. Another error of that call (a peer's earlier rejection, a broken buffer) wins.
template <typename Call>
[[noreturn]] void rejectCollective(const epcomm::InvalidArgument& error, Call&& call) {
  try {
    nb::gil_scoped_release release;  // waits (bounded) until every peer is past the call
    call();
  } catch (const epcomm::InvalidArgument&) {
    throw epcomm::InvalidArgument(std::string(error.what()) +
                                  " (nothing was launched; every rank skips this call and the "
                                  "Buffer stays usable)");
  }
  throw error;
}

// DeepEP-style precomputed layout (DispatchArgs::layout): num_tokens_per_rank [R] int32,
// is_token_in_rank [num_tokens, R] bool, num_tokens_per_expert [E] int32.
struct LayoutArrays {
  OptArray num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert;
};

void convertLayout(PyBuffer& self, const LayoutArrays& l, int num_tokens,
                   epcomm::DispatchLayout& out) {
  epcomm::EpBuffer& buf = self.get();
  const int device = buf.device();
  if (l.num_tokens_per_rank) {
    out.num_tokens_per_rank = static_cast<const int32_t*>(
        devicePtr(*l.num_tokens_per_rank, "num_tokens_per_rank", device, 1, {dt::kI32}));
    checkDim(*l.num_tokens_per_rank, "num_tokens_per_rank", 0, buf.numRanks(), "num_ranks");
  }
  if (l.is_token_in_rank) {
    out.is_token_in_rank = static_cast<const bool*>(
        devicePtr(*l.is_token_in_rank, "is_token_in_rank", device, 2, {dt::kBool}));
    checkDim(*l.is_token_in_rank, "is_token_in_rank", 0, num_tokens, "one row per token of x");
    checkDim(*l.is_token_in_rank, "is_token_in_rank", 1, buf.numRanks(), "num_ranks");
  }
  if (l.num_tokens_per_expert) {
    out.num_tokens_per_expert = static_cast<const int32_t*>(
        devicePtr(*l.num_tokens_per_expert, "num_tokens_per_expert", device, 1, {dt::kI32}));
    checkDim(*l.num_tokens_per_expert, "num_tokens_per_expert", 0, buf.config().config.num_experts,
             "the buffer's num_experts");
  }
}

void convertDispatchArgs(PyBuffer& self, const Array& x, const OptArray& topk_idx,
                         const OptArray& topk_weights, const OptArray& x_scales,
                         const OptArray& recv_x_out, const OptArray& recv_scales_out,
                         epcomm::DispatchArgs& args) {
  epcomm::EpBuffer& buf = self.get();
  const int device = buf.device();
  const int hidden = buf.config().config.hidden;
  const bool fp8 = !sameDtype(x.dtype(), dt::kBF16);
  args.x = devicePtr(x, "x", device, 2, {dt::kBF16, dt::kF8E4M3, dt::kU8, dt::kI8});
  args.dtype = fp8 ? epcomm::DType::kFP8E4M3 : epcomm::DType::kBF16;
  args.num_tokens = static_cast<int>(x.shape(0));
  checkDim(x, "x", 1, hidden, "the buffer's hidden");
  if (fp8) {
    if (!x_scales)
      throwInvalid("x_scales: required with FP8 x ([num_tokens, hidden / 128] float32)");
    const Array& s = *x_scales;
    args.x_scales =
        static_cast<const float*>(devicePtr(s, "x_scales", device, 2, {dt::kF32}, false));
    checkDim(s, "x_scales", 0, args.num_tokens, "one row per token of x");
    checkDim(s, "x_scales", 1, hidden / epcomm::kFp8BlockSize, "hidden / 128");
    args.scales_token_stride = s.stride(0);
    args.scales_col_stride = s.stride(1);
  } else if (x_scales) {
    throwInvalid("x_scales: given with BF16 x; scales go with FP8 x only");
  }
  args.topk = topkView(topk_idx, self, args.num_tokens);
  if (topk_weights) {
    args.topk_weights =
        static_cast<const float*>(devicePtr(*topk_weights, "topk_weights", device, 2, {dt::kF32}));
    checkDim(*topk_weights, "topk_weights", 0, args.num_tokens, "one row per token of x");
    if (topk_idx) checkDim(*topk_weights, "topk_weights", 1, args.topk.num_topk, "topk_idx's");
  }
  if (recv_x_out) args.recv_x_out = devicePtr(*recv_x_out, "recv_x_out", device, 2, {});
  if (recv_scales_out) {
    args.recv_scales_out =
        static_cast<float*>(devicePtr(*recv_scales_out, "recv_scales_out", device, 2, {dt::kF32}));
  }
}

// DispatchArgs::recv_topk_idx_out / recv_topk_weights_out: [rows, num_topk] caller buffers in
// topk_idx's dtype / float32 (rows: the caller's, as recv_x_out's; the C++ docs say which).
void convertTopkOut(PyBuffer& self, const OptArray& topk_idx, const OptArray& idx_out,
                    const OptArray& weights_out, epcomm::DispatchArgs& args) {
  if (!idx_out && !weights_out) return;
  if (!topk_idx) throwInvalid("recv_topk_idx_out / recv_topk_weights_out: need topk_idx");
  const int device = self.get().device();
  if (idx_out) {
    args.recv_topk_idx_out =
        devicePtr(*idx_out, "recv_topk_idx_out", device, 2, {dt::kI64, dt::kI32});
    if (!sameDtype(idx_out->dtype(), topk_idx->dtype())) {
      throwInvalid("recv_topk_idx_out: dtype " + dtypeName(idx_out->dtype()) +
                   ", expected topk_idx's " + dtypeName(topk_idx->dtype()));
    }
    checkDim(*idx_out, "recv_topk_idx_out", 1, args.topk.num_topk, "topk_idx's");
  }
  if (weights_out) {
    args.recv_topk_weights_out = static_cast<float*>(
        devicePtr(*weights_out, "recv_topk_weights_out", device, 2, {dt::kF32}));
    checkDim(*weights_out, "recv_topk_weights_out", 1, args.topk.num_topk, "topk_idx's");
  }
}

DispatchOutput dispatchOutput(PyBuffer& self, nb::handle x_obj, const Array& x,
                              const OptArray& topk_idx, nb::object handle_obj,
                              const epcomm::DispatchResult& r, const epcomm::DispatchArgs& args,
                              bool exact_count) {
  epcomm::EpBuffer& buf = self.get();
  const int device = buf.device();
  const int hidden = buf.config().config.hidden;
  // exact_count: the received rows; num_worst_tokens: the static row count; else the capacity.
  const size_t rows = exact_count                 ? static_cast<size_t>(r.num_recv_tokens_host)
                      : args.num_worst_tokens > 0 ? static_cast<size_t>(args.num_worst_tokens)
                                                  : static_cast<size_t>(r.capacity);
  const size_t topk = static_cast<size_t>(args.topk.num_topk);
  const size_t ranks = static_cast<size_t>(buf.numRanks());
  const size_t h = static_cast<size_t>(hidden);
  DispatchOutput out;
  out.buffer = pyself(&self);
  out.cache = &self.views;
  out.handle = handle_obj;
  out.device = device;
  out.framework = self.fw(x_obj);
  out.recv_x.set(r.recv_x, {rows, h}, x.dtype());
  out.recv_x_scales.set(r.recv_x_scales, {rows, h / epcomm::kFp8BlockSize}, dt::kF32);
  if (topk_idx) {
    out.recv_topk_idx.set(r.recv_topk_idx, {rows, topk}, topk_idx->dtype());
    out.recv_topk_weights.set(r.recv_topk_weights, {rows, topk}, dt::kF32);
  }
  out.recv_src_idx.set(r.recv_src_idx, {rows}, dt::kI32);
  out.num_recv_tokens.set(r.num_recv_tokens, {1}, dt::kI32, true);
  out.recv_rank_prefix.set(r.recv_rank_prefix, {ranks + 1}, dt::kI32, true);
  out.num_recv_tokens_per_expert.set(r.num_recv_tokens_per_expert,
                                     {static_cast<size_t>(buf.numLocalExperts())}, dt::kI32, true);
  out.combine_input.set(r.combine_input, {rows, h}, dt::kBF16);
  const size_t local_experts = static_cast<size_t>(buf.numLocalExperts());
  if (r.expert_offsets) {
    out.expert_offsets.set(r.expert_offsets, {local_experts + 1}, dt::kI32, true);
  }
  if (r.num_recv_tokens_per_expert_host) {
    out.num_recv_tokens_per_expert_list.emplace(r.num_recv_tokens_per_expert_host,
                                                r.num_recv_tokens_per_expert_host + local_experts);
  }
  if (r.num_recv_tokens_host >= 0) out.num_recv_tokens_host = r.num_recv_tokens_host;
  out.capacity = r.capacity;
  return out;
}

DispatchOutput dispatch(PyBuffer& self, nb::object x_obj, PyHandle* handle, nb::handle topk_idx_obj,
                        nb::handle topk_weights_obj, nb::handle x_scales_obj, int expert_alignment,
                        bool exact_count, nb::handle recv_x_out_obj, nb::handle recv_scales_out_obj,
                        std::optional<int> num_sms, nb::handle stream,
                        nb::handle num_tokens_per_rank_obj, nb::handle is_token_in_rank_obj,
                        nb::handle num_tokens_per_expert_obj, int num_worst_tokens,
                        bool expert_major, nb::handle recv_topk_idx_out_obj,
                        nb::handle recv_topk_weights_out_obj) {
  epcomm::EpBuffer& buf = self.get();
  cudaStream_t s = nullptr;
  nb::object handle_obj;
  if (!handle) {  // a new handle (allocates); pass one to reuse it
    handle_obj = nb::cast(PyHandle{buf.createHandle(), pyself(&self), &self});
    handle = nb::cast<PyHandle*>(handle_obj);
  } else {
    handle_obj = pyself(handle);
  }
  Array x;
  OptArray topk_idx;
  epcomm::DispatchArgs args;
  try {
    s = toStream(stream);
    x = asArray(x_obj, "x");
    handleOf(*handle, self);
    topk_idx = optArray(topk_idx_obj, "topk_idx");
    convertDispatchArgs(self, x, topk_idx, optArray(topk_weights_obj, "topk_weights"),
                        optArray(x_scales_obj, "x_scales"), optArray(recv_x_out_obj, "recv_x_out"),
                        optArray(recv_scales_out_obj, "recv_scales_out"), args);
    convertLayout(self,
                  LayoutArrays{optArray(num_tokens_per_rank_obj, "num_tokens_per_rank"),
                               optArray(is_token_in_rank_obj, "is_token_in_rank"),
                               optArray(num_tokens_per_expert_obj, "num_tokens_per_expert")},
                  args.num_tokens, args.layout);
    convertTopkOut(self, topk_idx, optArray(recv_topk_idx_out_obj, "recv_topk_idx_out"),
                   optArray(recv_topk_weights_out_obj, "recv_topk_weights_out"), args);
    if (num_worst_tokens < 0) {
      throwInvalid("num_worst_tokens: " + std::to_string(num_worst_tokens) +
                   ", expected >= 0 (0: off)");
    }
  } catch (const epcomm::InvalidArgument& e) {
    epcomm::DispatchArgs bad;
    bad.num_tokens = -1;
    rejectCollective(e, [&] { buf.dispatch(bad, handle->handle, s); });
  }
  args.expert_alignment = expert_alignment;
  args.exact_count = exact_count;
  args.num_worst_tokens = num_worst_tokens;
  args.expert_major = expert_major;
  args.num_sms = optInt(num_sms);

  epcomm::DispatchResult r;
  if (exact_count) {
    nb::gil_scoped_release release;  // blocks the host until the count is known
    r = buf.dispatch(args, handle->handle, s);
  } else {
    r = buf.dispatch(args, handle->handle, s);
  }
  DispatchOutput out = dispatchOutput(self, x_obj, x, topk_idx, handle_obj, r, args, exact_count);
  return out;
}

// `out` when given, else a new [rows, hidden] tensor from x's framework (x.new_empty, torch).
std::pair<nb::object, Array> outputFor(nb::object out, nb::handle x, size_t rows, int hidden,
                                       const char* op) {
  if (out.is_none()) {
    if (!nb::hasattr(x, "new_empty")) {
      throwInvalid(std::string(op) +
                   ": out= is required unless x is a torch tensor "
                   "(out is [num_tokens, hidden] bfloat16 on the buffer's device)");
    }
    out = x.attr("new_empty")(nb::make_tuple(rows, hidden));
  }
  return {out, asArray(out, "out")};
}

epcomm::LlPhase parsePhase(const std::string& phase) {
  if (phase == "both") return epcomm::LlPhase::kBoth;
  if (phase == "send") return epcomm::LlPhase::kSend;
  if (phase == "recv") return epcomm::LlPhase::kRecv;
  throwInvalid("phase: '" + phase + "', expected 'both', 'send' or 'recv'");
}

nb::dict configDict(const epcomm::ResolvedConfig& rc) {
  const epcomm::BufferConfig& c = rc.config;
  nb::dict d;
  d["device"] = c.device;
  d["hidden"] = c.hidden;
  d["num_experts"] = c.num_experts;
  d["max_topk"] = c.max_topk;
  d["max_tokens_per_rank"] = c.max_tokens_per_rank;
  d["ll_max_tokens_per_rank"] = c.ll_max_tokens_per_rank;
  d["mem_mode"] = epcomm::memModeName(c.mem_mode);
  d["timeout_s"] = c.timeout_s;
  d["first_op_timeout_s"] = c.first_op_timeout_s;
  d["num_sms"] = c.num_sms;
  d["ll_num_sms"] = c.ll_num_sms;
  d["scratch_bytes"] = c.scratch_bytes;
  d["ht_recv_rows"] = c.ht_recv_rows;
  d["num_ranks"] = rc.num_ranks;
  return d;
}

epcomm::BufferConfig makeConfig(std::optional<int> device, int hidden, int num_experts,
                                int max_topk, int max_tokens_per_rank, int ll_max_tokens_per_rank,
                                const std::string& mem_mode, std::optional<double> timeout_s,
                                std::optional<double> first_op_timeout_s,
                                std::optional<int> num_sms, std::optional<int> ll_num_sms,
                                size_t scratch_bytes, std::optional<int64_t> ht_recv_rows) {
  epcomm::BufferConfig c;
  c.device = optInt(device);
  c.hidden = hidden;
  c.num_experts = num_experts;
  c.max_topk = max_topk;
  c.max_tokens_per_rank = max_tokens_per_rank;
  c.ll_max_tokens_per_rank = ll_max_tokens_per_rank;
  c.mem_mode = epcomm::parseMemMode(mem_mode, "mem_mode");
  c.timeout_s = timeout_s ? *timeout_s : epcomm::kAuto;
  c.first_op_timeout_s = first_op_timeout_s ? *first_op_timeout_s : epcomm::kAuto;
  c.num_sms = optInt(num_sms);
  c.ll_num_sms = optInt(ll_num_sms);
  c.scratch_bytes = scratch_bytes;
  c.ht_recv_rows = ht_recv_rows ? *ht_recv_rows : epcomm::kAuto;
  return c;
}

#define EPCOMM_CONFIG_ARGS                                                                   \
  "device"_a = nb::none(), "hidden"_a = 7168, "num_experts"_a = 256, "max_topk"_a = 8,       \
  "max_tokens_per_rank"_a = 4096, "ll_max_tokens_per_rank"_a = 0, "mem_mode"_a = "auto",     \
  "timeout_s"_a = nb::none(), "first_op_timeout_s"_a = nb::none(), "num_sms"_a = nb::none(), \
  "ll_num_sms"_a = nb::none(), "scratch_bytes"_a = 0, "ht_recv_rows"_a = nb::none()

// A host-time loop in C++ for the overhead benchmark: calls `fn` n times, returns seconds per call.
double timeLoopCpp(const std::function<void()>& fn, int n) {
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) fn();
  auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(t1 - t0).count() / std::max(n, 1);
}

}  // namespace

NB_MODULE(_epcomm, m) {
  m.doc() = "epcomm C++ binding (use the epcomm package)";

  nb::enum_<ErrorCode>(m, "ErrorCode")
      .value("INTERNAL", ErrorCode::kInternal)
      .value("CUDA", ErrorCode::kCuda)
      .value("DRIVER", ErrorCode::kDriver)
      .value("MPI", ErrorCode::kMpi)
      .value("SYSTEM", ErrorCode::kSystem)
      .value("TIMEOUT", ErrorCode::kTimeout)
      .value("INVALID_ARGUMENT", ErrorCode::kInvalidArgument)
      .value("UNSUPPORTED", ErrorCode::kUnsupported)
      .value("REMOTE", ErrorCode::kRemote)
      .value("BROKEN", ErrorCode::kBroken);
  createErrorClasses(m);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const epcomm::Error& e) {
      raiseError(e);
    }
  });

  m.attr("__version__") = epcomm::versionString();
  m.attr("git_describe") = epcomm::gitDescribe();
  m.attr("MAX_RANKS") = epcomm::kMaxRanks;
  m.attr("MAX_EXPERTS") = epcomm::kMaxExperts;
  m.attr("MAX_TOPK") = epcomm::kMaxTopk;
  m.attr("MAX_HIDDEN") = epcomm::kMaxHidden;
  m.attr("HIDDEN_ALIGNMENT") = epcomm::kHiddenAlignment;
  m.attr("FP8_BLOCK_SIZE") = epcomm::kFp8BlockSize;
  m.attr("MAX_TOKENS_PER_RANK") = epcomm::kMaxTokensPerRank;
  m.attr("MAX_LL_TOKENS_PER_RANK") = epcomm::kMaxLlTokensPerRank;

  m.def("_device_count", [] {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return count;
  });
  m.def("_set_current_stream_fn", [](nb::object fn) {
    Py_XDECREF(g_current_stream_fn);
    g_current_stream_fn = fn.release().ptr();
  });
  m.def(
      "_stream_handle", [](nb::handle s) { return reinterpret_cast<uintptr_t>(toStream(s)); },
      "stream"_a = nb::none(), "The cudaStream_t (int) a stream argument resolves to.");

  m.def(
      "resolve_config",
      [](int num_ranks, std::optional<int> device, int hidden, int num_experts, int max_topk,
         int max_tokens_per_rank, int ll_max_tokens_per_rank, const std::string& mem_mode,
         std::optional<double> timeout_s, std::optional<double> first_op_timeout_s,
         std::optional<int> num_sms, std::optional<int> ll_num_sms, size_t scratch_bytes,
         std::optional<int64_t> ht_recv_rows) {
        return configDict(epcomm::resolveConfig(
            makeConfig(device, hidden, num_experts, max_topk, max_tokens_per_rank,
                       ll_max_tokens_per_rank, mem_mode, timeout_s, first_op_timeout_s, num_sms,
                       ll_num_sms, scratch_bytes, ht_recv_rows),
            num_ranks));
      },
      "num_ranks"_a, nb::kw_only(), EPCOMM_CONFIG_ARGS,
      "Checks a Buffer configuration on the host (no GPU) and returns it with kAuto values and "
      "environment overrides resolved. Raises InvalidArgument naming the field.");

  m.def(
      "bytes_for",
      [](int num_ranks, std::optional<int> device, int hidden, int num_experts, int max_topk,
         int max_tokens_per_rank, int ll_max_tokens_per_rank, const std::string& mem_mode,
         std::optional<double> timeout_s, std::optional<double> first_op_timeout_s,
         std::optional<int> num_sms, std::optional<int> ll_num_sms, size_t scratch_bytes,
         std::optional<int64_t> ht_recv_rows) {
        const epcomm::BufferSizes b = epcomm::EpBuffer::bytesFor(
            makeConfig(device, hidden, num_experts, max_topk, max_tokens_per_rank,
                       ll_max_tokens_per_rank, mem_mode, timeout_s, first_op_timeout_s, num_sms,
                       ll_num_sms, scratch_bytes, ht_recv_rows),
            num_ranks);
        nb::dict d;
        d["total"] = b.total;
        d["control"] = b.control;
        d["ht"] = b.ht;
        d["ht_recv"] = b.ht_recv;
        d["ht_combine"] = b.ht_combine;
        d["ll"] = b.ll;
        d["ll_dispatch_staging"] = b.ll_dispatch_staging;
        d["ll_combine_staging"] = b.ll_combine_staging;
        d["ll_outputs"] = b.ll_outputs;
        d["ll_bookkeeping"] = b.ll_bookkeeping;
        d["scratch"] = b.scratch;
        d["padding"] = b.padding;
        return d;
      },
      "num_ranks"_a, nb::kw_only(), EPCOMM_CONFIG_ARGS,
      "Symmetric bytes per rank a Buffer with this configuration allocates (C++ "
      "EpBuffer::bytesFor), with the breakdown of BufferSizes by region (total, control, ht, "
      "ht_recv, ht_combine, ll, its four parts, scratch, padding). Host only, no GPU.");

  m.def(
      "set_log_level",
      [](const std::string& level) {
        epcomm::LogLevel l;
        if (!epcomm::parseLogLevel(level, &l)) {
          throwInvalid("log level '" + level + "', expected OFF, WARN, INFO or TRACE");
        }
        epcomm::setLogLevel(l);
      },
      "level"_a);
  m.def("log_level", [] { return std::string(epcomm::logLevelName(epcomm::logLevel())); });

  // Test and benchmark helpers (not part of the public API).
  m.def(
      "_check_tensor",
      [](nb::handle obj, const std::string& name) {
        Array a = asArray(obj, name.c_str());  // as the ops import their tensor arguments
        devicePtr(a, name.c_str(), -1, -1, {});
        return nb::make_tuple(shapeText(a), dtypeName(a.dtype()));
      },
      "array"_a, "name"_a = "x");
  m.def(
      "_describe",
      [](nb::handle obj) {
        Array a = asArray(obj, "array");  // as the ops import their tensor arguments
        std::vector<int64_t> shape, strides;
        for (size_t i = 0; i < a.ndim(); ++i) {
          shape.push_back(static_cast<int64_t>(a.shape(i)));
          strides.push_back(a.stride(i));
        }
        return nb::make_tuple(shape, strides, dtypeName(a.dtype()), deviceName(a.device_type()),
                              a.device_id());
      },
      "array"_a);
  m.def(
      "_roundtrip",
      [](nb::object obj) {
        // A new view of the same memory made by the same code that makes the result views.
        Array a = asArray(obj, "array");
        if (a.ndim() < 1 || a.ndim() > 3 || !isRowMajor(a))
          throwInvalid("_roundtrip: 1-3D, row-major");
        const void* p = static_cast<const char*>(a.data_handle()) + a.byte_offset();
        const Framework fw = frameworkOf(obj);
        switch (a.ndim()) {
          case 1:
            return view(p, {a.shape(0)}, a.dtype(), a.device_id(), obj, fw, a.device_type());
          case 2:
            return view(p, {a.shape(0), a.shape(1)}, a.dtype(), a.device_id(), obj, fw,
                        a.device_type());
          default:
            return view(p, {a.shape(0), a.shape(1), a.shape(2)}, a.dtype(), a.device_id(), obj, fw,
                        a.device_type());
        }
      },
      "array"_a);

  // --- Bootstrap --------------------------------------------------------------------------------
  nb::class_<epcomm::Bootstrap>(m, "Bootstrap",
                                "How ranks find each other (abstract). Use CallbackBootstrap or "
                                "epcomm.bootstrap_from_torch / bootstrap_from_mpi4py.")
      .def_prop_ro("rank", &epcomm::Bootstrap::rank)
      .def_prop_ro("size", &epcomm::Bootstrap::size)
      .def_prop_ro("local_rank", &epcomm::Bootstrap::localRank)
      .def_prop_ro("local_size", &epcomm::Bootstrap::localSize)
      .def_prop_ro("local_ranks", &epcomm::Bootstrap::localRanks)
      .def_prop_ro("num_nodes", &epcomm::Bootstrap::numNodes)
      .def(
          "all_gather",
          [](epcomm::Bootstrap& b, nb::bytes data) {
            const size_t n = data.size();
            std::string in(data.c_str(), n);
            std::string out(n * static_cast<size_t>(b.size()), '\0');
            {
              nb::gil_scoped_release release;
              b.allGather(in.data(), out.data(), n);
            }
            return nb::bytes(out.data(), out.size());
          },
          "data"_a, "Collective: every rank's bytes (same length everywhere), in rank order.")
      .def(
          "barrier",
          [](epcomm::Bootstrap& b) {
            nb::gil_scoped_release release;
            b.barrier();
          },
          "Collective host barrier.")
      .def(
          "select_device", [](const epcomm::Bootstrap& b) { return epcomm::selectDevice(b); },
          "Makes device local_rank % device_count current and returns it (raises CudaError "
          "without a GPU).");

  nb::class_<epcomm::CallbackBootstrap, epcomm::Bootstrap>(m, "CallbackBootstrap")
      .def(
          "__init__",
          [](epcomm::CallbackBootstrap* self, int rank, int size, nb::object all_gather,
             nb::object barrier) {
            Callbacks cb = makeCallbacks(size, std::move(all_gather), std::move(barrier));
            nb::gil_scoped_release release;  // collective: all-gathers the host identities
            new (self) epcomm::CallbackBootstrap(rank, size, std::move(cb.all_gather),
                                                 std::move(cb.barrier));
          },
          "rank"_a, "size"_a, "all_gather"_a, "barrier"_a = nb::none());

  // --- Handle -----------------------------------------------------------------------------------
  nb::class_<PyHandle>(m, "Handle",
                       "Routing of one HT dispatch, reused by combine and cached dispatch. Create "
                       "with Buffer.create_handle() once and reuse it every layer/step.")
      .def_prop_ro("num_tokens", [](const PyHandle& h) { return h.handle.numTokens(); })
      .def_prop_ro("num_topk", [](const PyHandle& h) { return h.handle.numTopk(); })
      .def_prop_ro("num_tokens_per_rank",
                   [](nb::handle self) {
                     PyHandle& h = nb::cast<PyHandle&>(self);
                     return view(h.handle.numTokensPerRank(),
                                 {static_cast<size_t>(h.owner->get().numRanks())}, dt::kI32,
                                 h.owner->get().device(), self,
                                 h.owner->framework == Framework::kAuto ? Framework::kDlpack
                                                                        : h.owner->framework);
                   })
      .def_prop_ro("num_tokens_per_expert",
                   [](nb::handle self) {
                     PyHandle& h = nb::cast<PyHandle&>(self);
                     return view(h.handle.numTokensPerExpert(),
                                 {static_cast<size_t>(h.owner->get().config().config.num_experts)},
                                 dt::kI32, h.owner->get().device(), self,
                                 h.owner->framework == Framework::kAuto ? Framework::kDlpack
                                                                        : h.owner->framework);
                   })
      .def_prop_ro("is_token_in_rank",
                   [](nb::handle self) {
                     PyHandle& h = nb::cast<PyHandle&>(self);
                     return view(h.handle.isTokenInRank(),
                                 {static_cast<size_t>(h.handle.numTokens()),
                                  static_cast<size_t>(h.owner->get().numRanks())},
                                 dt::kBool, h.owner->get().device(), self,
                                 h.owner->framework == Framework::kAuto ? Framework::kDlpack
                                                                        : h.owner->framework);
                   })
      .def_prop_ro("token_slot", [](nb::handle self) {
        PyHandle& h = nb::cast<PyHandle&>(self);
        return view(
            h.handle.tokenSlot(),
            {static_cast<size_t>(h.handle.numTokens()),
             static_cast<size_t>(h.owner->get().numRanks())},
            dt::kI32, h.owner->get().device(), self,
            h.owner->framework == Framework::kAuto ? Framework::kDlpack : h.owner->framework);
      });

#define EPCOMM_VIEW(Cls, name) def_prop_ro(#name, [](Cls& o) { return o.get(o.name); })
  nb::class_<DispatchOutput>(m, "DispatchResult",
                             "Views of one HT dispatch's outputs (include/epcomm/ops.hpp "
                             "DispatchResult), made on first access. Rows are "
                             "num_recv_tokens_host with exact_count, else capacity. None where "
                             "the dispatch has no such output.")
      .EPCOMM_VIEW(DispatchOutput, recv_x)
      .EPCOMM_VIEW(DispatchOutput, recv_x_scales)
      .EPCOMM_VIEW(DispatchOutput, recv_topk_idx)
      .EPCOMM_VIEW(DispatchOutput, recv_topk_weights)
      .EPCOMM_VIEW(DispatchOutput, recv_src_idx)
      .EPCOMM_VIEW(DispatchOutput, num_recv_tokens)
      .EPCOMM_VIEW(DispatchOutput, recv_rank_prefix)
      .EPCOMM_VIEW(DispatchOutput, num_recv_tokens_per_expert)
      .EPCOMM_VIEW(DispatchOutput, combine_input)
      .EPCOMM_VIEW(DispatchOutput, expert_offsets)
      .def_ro("num_recv_tokens_per_expert_list", &DispatchOutput::num_recv_tokens_per_expert_list)
      .def_ro("handle", &DispatchOutput::handle)
      .def_ro("num_recv_tokens_host", &DispatchOutput::num_recv_tokens_host)
      .def_ro("capacity", &DispatchOutput::capacity);

  nb::class_<LlDispatchOutput>(m, "LlDispatchResult",
                               "Views of one LL dispatch's outputs, expert-major, made on first "
                               "access.")
      .EPCOMM_VIEW(LlDispatchOutput, recv_x)
      .EPCOMM_VIEW(LlDispatchOutput, recv_x_scales)
      .EPCOMM_VIEW(LlDispatchOutput, num_recv_tokens_per_expert)
      .EPCOMM_VIEW(LlDispatchOutput, recv_src_info)
      .def_ro("rows_per_expert", &LlDispatchOutput::rows_per_expert);
#undef EPCOMM_VIEW

  // --- Buffer -----------------------------------------------------------------------------------
  nb::class_<PyBuffer>(
      m, "Buffer", nb::is_weak_referenceable(),
      "The symmetric GPU buffer this rank shares with its EP group (C++ epcomm::EpBuffer), and "
      "the dispatch/combine ops on it.\n\n"
      "Buffer(bootstrap, *, hidden, num_experts, max_topk, max_tokens_per_rank, "
      "ll_max_tokens_per_rank, device, mem_mode, timeout_s, first_op_timeout_s, num_sms, "
      "ll_num_sms, scratch_bytes, ht_recv_rows, framework='auto') is collective over the "
      "bootstrap's ranks. "
      "None means the library default (kAuto). Tensors are any __dlpack__ CUDA tensor; results "
      "are views into the buffer, in the framework of the call's x ('auto') or the one named "
      "(torch, cupy, jax, dlpack). Streams: None (torch's current stream, else 0), an int "
      "cudaStream_t or a stream object. destroy() (collective) frees it; so does "
      "leaving a `with` block, or garbage collection as a last resort.")
      .def(
          "__init__",
          [](PyBuffer* self, epcomm::Bootstrap& bootstrap, std::optional<int> device, int hidden,
             int num_experts, int max_topk, int max_tokens_per_rank, int ll_max_tokens_per_rank,
             const std::string& mem_mode, std::optional<double> timeout_s,
             std::optional<double> first_op_timeout_s, std::optional<int> num_sms,
             std::optional<int> ll_num_sms, size_t scratch_bytes,
             std::optional<int64_t> ht_recv_rows, const std::string& framework) {
            Framework fw = Framework::kAuto;
            epcomm::BufferConfig config;
            std::unique_ptr<epcomm::EpBuffer> buffer;
            try {
              fw = parseFramework(framework);
              config = makeConfig(device, hidden, num_experts, max_topk, max_tokens_per_rank,
                                  ll_max_tokens_per_rank, mem_mode, timeout_s, first_op_timeout_s,
                                  num_sms, ll_num_sms, scratch_bytes, ht_recv_rows);
            } catch (const epcomm::InvalidArgument& e) {
              // Creation is collective: fail it on every rank (the library agrees on each step)
              // with a configuration it rejects, then raise this rank's own message.
              epcomm::BufferConfig bad;
              bad.hidden = 0;
              try {
                nb::gil_scoped_release release;
                buffer = std::make_unique<epcomm::EpBuffer>(bootstrap, bad);
              } catch (const epcomm::InvalidArgument&) {
              }
              throw e;
            }
            {
              nb::gil_scoped_release release;  // collective, may take seconds
              buffer = std::make_unique<epcomm::EpBuffer>(bootstrap, config);
            }
            new (self)
                PyBuffer{std::move(buffer), nb::find(&bootstrap), fw, 0, Framework::kDlpack, {}};
          },
          "bootstrap"_a, nb::kw_only(), EPCOMM_CONFIG_ARGS, "framework"_a = "auto")
      .def_prop_ro("rank", [](const PyBuffer& b) { return b.get().rank(); })
      .def_prop_ro("num_ranks", [](const PyBuffer& b) { return b.get().numRanks(); })
      .def_prop_ro("device", [](const PyBuffer& b) { return b.get().device(); })
      .def_prop_ro(
          "mem_mode",
          [](const PyBuffer& b) { return std::string(epcomm::memModeName(b.get().memMode())); })
      .def_prop_ro("num_local_experts", [](const PyBuffer& b) { return b.get().numLocalExperts(); })
      .def_prop_ro("bytes_per_rank", [](const PyBuffer& b) { return b.get().bytesPerRank(); })
      .def_prop_ro("config", [](const PyBuffer& b) { return configDict(b.get().config()); })
      .def_prop_ro("hidden", [](const PyBuffer& b) { return b.get().config().config.hidden; })
      .def_prop_ro("num_experts",
                   [](const PyBuffer& b) { return b.get().config().config.num_experts; })
      .def_prop_ro("max_topk", [](const PyBuffer& b) { return b.get().config().config.max_topk; })
      .def_prop_ro("scratch_offset", [](const PyBuffer& b) { return b.get().scratchOffset(); })
      .def_prop_ro("scratch_bytes", [](const PyBuffer& b) { return b.get().scratchBytes(); })
      .def_prop_ro("destroyed", [](const PyBuffer& b) { return !b.buffer; })
      .def(
          "peer_base",
          [](const PyBuffer& b, int rank) {
            return reinterpret_cast<uintptr_t>(b.get().peerBase(rank));
          },
          "rank"_a)
      .def("create_handle",
           [](nb::handle self) {
             PyBuffer& b = nb::cast<PyBuffer&>(self);
             return PyHandle{b.get().createHandle(), nb::borrow(self), &b};
           })
      .def(
          "layout",
          [](PyBuffer& self, Array topk_idx, PyHandle& handle, nb::handle stream) {
            const epcomm::EpHandle& h = handleOf(handle, self);
            (void)h;
            epcomm::TopkView view = topkView(topk_idx, self, -1);
            self.get().layout(view, handle.handle, toStream(stream));
          },
          "topk_idx"_a, "handle"_a, "stream"_a = nb::none())
      .def("dispatch", &dispatch, "x"_a, nb::arg("handle").none() = nb::none(), nb::kw_only(),
           "topk_idx"_a = nb::none(), "topk_weights"_a = nb::none(), "x_scales"_a = nb::none(),
           "expert_alignment"_a = 1, "exact_count"_a = false, "recv_x_out"_a = nb::none(),
           "recv_scales_out"_a = nb::none(), "num_sms"_a = nb::none(), "stream"_a = nb::none(),
           "num_tokens_per_rank"_a = nb::none(), "is_token_in_rank"_a = nb::none(),
           "num_tokens_per_expert"_a = nb::none(), "num_worst_tokens"_a = 0,
           "expert_major"_a = false, "recv_topk_idx_out"_a = nb::none(),
           "recv_topk_weights_out"_a = nb::none())
      .def(
          "combine",
          [](PyBuffer& self, nb::object x_obj, PyHandle& handle, nb::object out_obj,
             nb::handle topk_weights, nb::handle bias_obj, std::optional<int> num_sms,
             nb::handle stream, nb::handle scale_weights_obj, nb::object recv_topk_weights_obj,
             nb::object combined_topk_weights_obj) -> nb::object {
            epcomm::EpBuffer& buf = self.get();
            const int device = buf.device();
            const int hidden = buf.config().config.hidden;
            const epcomm::EpHandle& h = handle.handle;
            cudaStream_t s = nullptr;
            epcomm::CombineArgs args;
            nb::object out, combined;
            const bool reduce_weights = !recv_topk_weights_obj.is_none();
            try {
              s = toStream(stream);
              handleOf(handle, self);
              // `topk_weights` was the old name of `scale_weights`. It is refused rather than
              // aliased: a DeepEP user passing topk_weights= expects combined weights, not
              // scaled rows, and would apply the weights twice.
              if (!topk_weights.is_none()) {
                throwInvalid(
                    "combine(topk_weights=...): renamed scale_weights, which SCALES each row by "
                    "the token's weights (DeepEP's combine does not). For DeepEP's combined "
                    "weights pass recv_topk_weights=; to scale rows pass scale_weights=");
              }
              Array x = asArray(x_obj, "x");
              args.x = devicePtr(x, "x", device, 2, {dt::kBF16});
              checkDim(x, "x", 1, hidden, "the buffer's hidden");
              auto [o, out_arr] =
                  outputFor(out_obj, x_obj, static_cast<size_t>(h.numTokens()), hidden, "combine");
              out = o;
              args.out = devicePtr(out_arr, "out", device, 2, {dt::kBF16});
              checkDim(out_arr, "out", 0, h.numTokens(), "the handle's num_tokens");
              checkDim(out_arr, "out", 1, hidden, "the buffer's hidden");
              const OptArray scale_weights = optArray(scale_weights_obj, "scale_weights");
              const OptArray bias = optArray(bias_obj, "bias");
              if (scale_weights) {
                // Not DeepEP's semantics (its combine does not scale): see CombineArgs.
                args.scale_weights = static_cast<const float*>(
                    devicePtr(*scale_weights, "scale_weights", device, 2, {dt::kF32}));
                checkDim(*scale_weights, "scale_weights", 0, h.numTokens(),
                         "the handle's num_tokens");
              }
              if (reduce_weights) {
                // recv_topk_weights [rows of x, num_topk] as received; combined_topk_weights
                // [num_tokens, num_topk] is written (allocated like recv_topk_weights if None).
                Array rw = asArray(recv_topk_weights_obj, "recv_topk_weights");
                args.recv_topk_weights = static_cast<const float*>(
                    devicePtr(rw, "recv_topk_weights", device, 2, {dt::kF32}));
                checkDim(rw, "recv_topk_weights", 0, static_cast<int64_t>(x.shape(0)),
                         "one row per row of x");
                checkDim(rw, "recv_topk_weights", 1, h.numTopk(), "the handle's num_topk");
                combined = combined_topk_weights_obj;
                if (combined.is_none()) {
                  if (!nb::hasattr(recv_topk_weights_obj, "new_empty")) {
                    throwInvalid(
                        "combined_topk_weights: required unless recv_topk_weights is a "
                        "torch tensor ([num_tokens, num_topk] float32)");
                  }
                  combined = recv_topk_weights_obj.attr("new_empty")(
                      nb::make_tuple(h.numTokens(), h.numTopk()));
                }
                Array cw = asArray(combined, "combined_topk_weights");
                args.combined_topk_weights = static_cast<float*>(
                    devicePtr(cw, "combined_topk_weights", device, 2, {dt::kF32}));
                checkDim(cw, "combined_topk_weights", 0, h.numTokens(), "the handle's num_tokens");
                checkDim(cw, "combined_topk_weights", 1, h.numTopk(), "the handle's num_topk");
              } else if (!combined_topk_weights_obj.is_none()) {
                throwInvalid("combined_topk_weights: given without recv_topk_weights");
              }
              if (bias) {
                args.bias = devicePtr(*bias, "bias", device, 2, {dt::kBF16});
                checkDim(*bias, "bias", 0, h.numTokens(), "the handle's num_tokens");
                checkDim(*bias, "bias", 1, hidden, "the buffer's hidden");
              }
            } catch (const epcomm::InvalidArgument& e) {
              rejectCollective(e, [&] { buf.combine(epcomm::CombineArgs{}, h, s); });
            }
            args.num_sms = optInt(num_sms);
            buf.combine(args, h, s);
            if (reduce_weights) return nb::make_tuple(out, combined);
            return out;
          },
          "x"_a, "handle"_a, "out"_a = nb::none(), nb::kw_only(), "topk_weights"_a = nb::none(),
          "bias"_a = nb::none(), "num_sms"_a = nb::none(), "stream"_a = nb::none(),
          "scale_weights"_a = nb::none(), "recv_topk_weights"_a = nb::none(),
          "combined_topk_weights"_a = nb::none(),
          "Collective. Returns out, or (out, combined_topk_weights) when recv_topk_weights is "
          "given. scale_weights SCALES each row from rank r by the sum of the token's weights "
          "on r; DeepEP's combine does not: do not pass the weights twice. topk_weights= (its "
          "old name) is refused with an error that says so.")
      .def(
          "low_latency_dispatch",
          [](PyBuffer& self, nb::object x_obj, nb::object topk_idx_obj, nb::object topk_weights_obj,
             bool use_fp8, std::optional<int> num_sms, nb::handle stream,
             const std::string& phase_name, nb::handle cumulative_recv_counts_obj) {
            epcomm::EpBuffer& buf = self.get();
            const int device = buf.device();
            const int hidden = buf.config().config.hidden;
            cudaStream_t s = nullptr;
            epcomm::LlPhase phase = epcomm::LlPhase::kBoth;
            epcomm::LlDispatchArgs args;
            try {
              s = toStream(stream);
              phase = parsePhase(phase_name);
              if (phase != epcomm::LlPhase::kRecv) {  // the receiving half reads no input
                Array x = asArray(x_obj, "x");
                args.x = devicePtr(x, "x", device, 2, {dt::kBF16});
                args.num_tokens = static_cast<int>(x.shape(0));
                checkDim(x, "x", 1, hidden, "the buffer's hidden");
                args.topk = topkView(asArray(topk_idx_obj, "topk_idx"), self, args.num_tokens);
                if (!topk_weights_obj.is_none()) {  // optional: may come at combine instead
                  Array w = asArray(topk_weights_obj, "topk_weights");
                  args.topk_weights = static_cast<const float*>(
                      devicePtr(w, "topk_weights", device, 2, {dt::kF32}));
                  checkDim(w, "topk_weights", 0, args.num_tokens, "one row per token of x");
                  checkDim(w, "topk_weights", 1, args.topk.num_topk, "topk_idx's");
                }
              }
              const OptArray cumulative_recv_counts =
                  optArray(cumulative_recv_counts_obj, "cumulative_recv_counts");
              if (cumulative_recv_counts) {  // read by the receiving half (kRecv or both)
                args.cumulative_recv_counts = static_cast<int32_t*>(const_cast<void*>(devicePtr(
                    *cumulative_recv_counts, "cumulative_recv_counts", device, 1, {dt::kI32})));
                checkDim(*cumulative_recv_counts, "cumulative_recv_counts", 0,
                         buf.numLocalExperts(), "num_local_experts");
              }
            } catch (const epcomm::InvalidArgument& e) {
              epcomm::LlDispatchArgs bad;
              bad.num_tokens = -1;
              const epcomm::LlPhase reject_phase =
                  phase == epcomm::LlPhase::kRecv ? static_cast<epcomm::LlPhase>(0) : phase;
              rejectCollective(e, [&] { buf.lowLatencyDispatch(bad, s, reject_phase); });
            }
            args.use_fp8 = use_fp8;
            args.num_sms = optInt(num_sms);
            epcomm::LlDispatchResult r = buf.lowLatencyDispatch(args, s, phase);
            if (phase != epcomm::LlPhase::kRecv) {
              self.last_ll_num_tokens = args.num_tokens;
              self.last_ll_framework = self.fw(x_obj);
            }
            const size_t experts = static_cast<size_t>(buf.numLocalExperts());
            const size_t rows = static_cast<size_t>(r.rows_per_expert);
            const size_t h = static_cast<size_t>(hidden);
            LlDispatchOutput out;
            out.buffer = pyself(&self);
            out.cache = &self.views;
            out.device = device;
            out.framework = x_obj.is_none() ? self.last_ll_framework : self.fw(x_obj);
            out.recv_x.set(r.recv_x, {experts, rows, h}, use_fp8 ? dt::kF8E4M3 : dt::kBF16);
            out.recv_x_scales.set(r.recv_x_scales, {experts, rows, h / epcomm::kFp8BlockSize},
                                  dt::kF32);
            out.num_recv_tokens_per_expert.set(r.num_recv_tokens_per_expert, {experts}, dt::kI32);
            out.recv_src_info.set(r.recv_src_info, {experts, rows}, dt::kI32);
            out.rows_per_expert = r.rows_per_expert;
            return out;
          },
          "x"_a.none(), "topk_idx"_a.none(), "topk_weights"_a = nb::none(), nb::kw_only(),
          "use_fp8"_a = false, "num_sms"_a = nb::none(), "stream"_a = nb::none(),
          "phase"_a = "both", "cumulative_recv_counts"_a = nb::none())
      .def(
          "low_latency_combine",
          [](PyBuffer& self, nb::object x_obj, nb::object out_obj, std::optional<int> num_sms,
             nb::handle stream, const std::string& phase_name, nb::object topk_weights_obj) {
            epcomm::EpBuffer& buf = self.get();
            const int device = buf.device();
            const int hidden = buf.config().config.hidden;
            cudaStream_t s = nullptr;
            epcomm::LlPhase phase = epcomm::LlPhase::kBoth;
            epcomm::LlCombineArgs args;
            nb::object out = out_obj;
            try {
              s = toStream(stream);
              phase = parsePhase(phase_name);
              if (phase != epcomm::LlPhase::kRecv) {  // x is read by the sending half
                Array x = asArray(x_obj, "x");
                args.x = devicePtr(x, "x", device, 3, {dt::kBF16});
                checkDim(x, "x", 0, buf.numLocalExperts(), "num_local_experts");
                checkDim(x, "x", 2, hidden, "the buffer's hidden");
                if (!topk_weights_obj.is_none()) {  // token side, instead of the dispatch's
                  Array w = asArray(topk_weights_obj, "topk_weights");
                  args.topk_weights = static_cast<const float*>(
                      devicePtr(w, "topk_weights", device, 2, {dt::kF32}));
                  checkDim(w, "topk_weights", 0, self.last_ll_num_tokens,
                           "the tokens of the matching low_latency_dispatch");
                }
              }
              if (phase != epcomm::LlPhase::kSend) {  // out is written by the receiving half
                auto [o, out_arr] =
                    outputFor(out_obj, x_obj, static_cast<size_t>(self.last_ll_num_tokens), hidden,
                              "low_latency_combine");
                out = o;
                args.out = devicePtr(out_arr, "out", device, 2, {dt::kBF16});
                checkDim(out_arr, "out", 0, self.last_ll_num_tokens,
                         "the tokens of the matching low_latency_dispatch");
                checkDim(out_arr, "out", 1, hidden, "the buffer's hidden");
              }
            } catch (const epcomm::InvalidArgument& e) {
              const epcomm::LlPhase reject_phase =
                  phase == epcomm::LlPhase::kRecv ? static_cast<epcomm::LlPhase>(0) : phase;
              rejectCollective(
                  e, [&] { buf.lowLatencyCombine(epcomm::LlCombineArgs{}, s, reject_phase); });
            }
            args.num_sms = optInt(num_sms);
            buf.lowLatencyCombine(args, s, phase);
            return out;
          },
          "x"_a.none(), "out"_a = nb::none(), nb::kw_only(), "num_sms"_a = nb::none(),
          "stream"_a = nb::none(), "phase"_a = "both", "topk_weights"_a = nb::none())
      .def(
          "barrier",
          [](PyBuffer& self, nb::handle stream) { self.get().barrier(toStream(stream)); },
          "stream"_a = nb::none())
      .def(
          "sync",
          [](PyBuffer& self, nb::handle stream) {
            cudaStream_t s = toStream(stream);
            nb::gil_scoped_release release;
            self.get().sync(s);
          },
          "stream"_a = nb::none())
      .def(
          "synchronizing_barrier",
          [](PyBuffer& self, nb::handle stream) {
            cudaStream_t s = toStream(stream);
            nb::gil_scoped_release release;
            self.get().synchronizingBarrier(s);
          },
          "stream"_a = nb::none())
      .def("check_error", [](const PyBuffer& self) { self.get().checkError(); })
      .def("abort", [](PyBuffer& self) { self.get().abort(); })
      .def("destroy", &PyBuffer::destroy,
           "Collective: frees the buffer now (every rank). Views into it become invalid.")
      .def(
          "_time_cpp",
          [](PyBuffer& self, const std::string& op, int iters, nb::object x_obj, PyHandle* handle,
             OptArray topk_idx, OptArray topk_weights, OptArray out, nb::handle stream) {
            // The C++ host time per call of `op` with arguments converted once: the baseline
            // the binding's own overhead is measured against (python -m epcomm.bench).
            epcomm::EpBuffer& buf = self.get();
            const int device = buf.device();
            Array x = nb::cast<Array>(x_obj);
            cudaStream_t s = toStream(stream);
            std::function<void()> call;
            if (op == "dispatch" || op == "cached_dispatch") {
              if (!handle) throwInvalid("_time_cpp: handle= is required");
              epcomm::DispatchArgs args;
              args.x = devicePtr(x, "x", device, 2, {dt::kBF16});
              args.num_tokens = static_cast<int>(x.shape(0));
              if (op == "dispatch") {
                args.topk = topkView(topk_idx, self, args.num_tokens);
                if (topk_weights) {
                  args.topk_weights = static_cast<const float*>(
                      devicePtr(*topk_weights, "topk_weights", device, 2, {dt::kF32}));
                }
              }
              epcomm::EpHandle* h = &handle->handle;
              call = [&buf, args, h, s] { buf.dispatch(args, *h, s); };
            } else if (op == "combine") {
              if (!handle || !out) throwInvalid("_time_cpp: handle= and out= are required");
              epcomm::CombineArgs args;
              args.x = devicePtr(x, "x", device, 2, {dt::kBF16});
              args.out = devicePtr(*out, "out", device, 2, {dt::kBF16});
              const epcomm::EpHandle* h = &handle->handle;
              call = [&buf, args, h, s] { buf.combine(args, *h, s); };
            } else if (op == "ll_dispatch") {
              if (!topk_idx || !topk_weights) throwInvalid("_time_cpp: topk_idx, topk_weights");
              epcomm::LlDispatchArgs args;
              args.x = devicePtr(x, "x", device, 2, {dt::kBF16});
              args.num_tokens = static_cast<int>(x.shape(0));
              args.topk = topkView(topk_idx, self, args.num_tokens);
              args.topk_weights = static_cast<const float*>(
                  devicePtr(*topk_weights, "topk_weights", device, 2, {dt::kF32}));
              // LL dispatch and combine alternate: time the pair with the combine below.
              epcomm::LlCombineArgs cargs;
              if (!out) throwInvalid("_time_cpp: ll_dispatch needs out= (the combine output)");
              cargs.out = devicePtr(*out, "out", device, 2, {dt::kBF16});
              call = [&buf, args, cargs, s]() mutable {
                epcomm::LlDispatchResult r = buf.lowLatencyDispatch(args, s);
                cargs.x = r.recv_x;
                buf.lowLatencyCombine(cargs, s);
              };
            } else {
              throwInvalid("_time_cpp: op '" + op +
                           "', expected dispatch, cached_dispatch, "
                           "combine or ll_dispatch");
            }
            return timeLoopCpp(call, iters);
          },
          "op"_a, "iters"_a, "x"_a, nb::arg("handle").none() = nb::none(),
          "topk_idx"_a = nb::none(), "topk_weights"_a = nb::none(), "out"_a = nb::none(),
          "stream"_a = nb::none())
      .def("__enter__", [](nb::handle self) { return nb::borrow(self); })
      .def("__exit__", [](PyBuffer& self, nb::args) { self.destroy(); });
}
