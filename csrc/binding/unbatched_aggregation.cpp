// The lean path of an unbatched aggregation call: fastmtl._C.dual_cone_weights_unbatched(gram, pref,
// norm_eps, reg_eps, each) -> weights, or None where the call is not a plain one, which the caller
// (fastmtl.aggregation's UPGrad and DualProj) then sends through the registered op instead.
//
// Why not the op: for one [T, T] Gram matrix the solve takes a few microseconds, and the op's boxed
// call from Python (argument parsing against the schema, the Autograd then the CPU kernel, copies in
// and out) several times that; a training step calls it once, a benchmark or a batched sweep of
// single calls many times (issue 17). "Plain" is what the op's kernels would compute the same way
// with nothing else to see the call: an exact torch.Tensor on the CPU, strided, not requiring grad,
// not wrapped by functorch (vmap, grad) and with no Python dispatch mode active (fake tensors,
// tracing, logging modes see the op). The caller keeps torch.compile on the op path.
#include "binding/unbatched_aggregation.h"

#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include "ops/aggregation_unbatched.h"

namespace py = pybind11;

namespace fastmtl::binding {
namespace {

// Keys that mean something other than the CPU kernel would see or handle the tensor.
constexpr c10::DispatchKeySet kWrapperKeys({c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::Python,
                                            c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Functionalize,
                                            c10::DispatchKey::Conjugate, c10::DispatchKey::Negative,
                                            c10::DispatchKey::ZeroTensor});

// The tensor behind obj if it is a plain CPU tensor the lean path may read, else nullptr.
const at::Tensor* plain_cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.is_cpu() || t.layout() != at::kStrided || t.requires_grad() ||
      t.key_set().has_any(kWrapperKeys))
    return nullptr;
  return &t;
}

// Sets the Python exception torch raises for a c10 error (ValueError, TypeError, RuntimeError), with
// the message only: the C++ backtrace is noise to a Python user.
void set_python_error(const c10::Error& e) {
  PyObject* type = dynamic_cast<const c10::ValueError*>(&e)  ? PyExc_ValueError
                   : dynamic_cast<const c10::TypeError*>(&e) ? PyExc_TypeError
                                                             : PyExc_RuntimeError;
  PyErr_SetString(type, e.what_without_backtrace());
}

// dual_cone_weights_unbatched(gram, pref, norm_eps, reg_eps, each): a METH_FASTCALL function, not a
// pybind11 one, because pybind11's generic dispatcher (argument loaders, overload resolution) costs
// about a microsecond of a call that should take a few, more when its code is out of the cache.
PyObject* dual_cone_weights_unbatched(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_Format(PyExc_TypeError,
                 "fastmtl._C.dual_cone_weights_unbatched: expected 5 arguments (gram, pref, norm_eps, reg_eps, "
                 "each), got %zd",
                 nargs);
    return nullptr;
  }
  const double norm_eps = PyFloat_AsDouble(args[2]), reg_eps = PyFloat_AsDouble(args[3]);
  const int each = PyObject_IsTrue(args[4]);
  if (PyErr_Occurred() || each < 0) return nullptr;  // a non-number eps; the message is Python's
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) Py_RETURN_NONE;
  const at::Tensor* g = plain_cpu_tensor(args[0]);
  if (g == nullptr || g->dim() != 2 || g->size(0) == 0) Py_RETURN_NONE;
  at::Tensor p;
  if (args[1] != Py_None) {
    const at::Tensor* given = plain_cpu_tensor(args[1]);
    if (given == nullptr || given->dim() != 1 || given->size(0) != g->size(0)) Py_RETURN_NONE;
    p = *given;
  }
  try {
    return THPVariable_Wrap(ops::dual_cone_weights_unbatched(*g, p, norm_eps, reg_eps, each != 0));
  } catch (const c10::Error& e) {
    set_python_error(e);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef dual_cone_weights_unbatched_def = {
    "dual_cone_weights_unbatched",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&dual_cone_weights_unbatched)), METH_FASTCALL,
    "dual_cone_weights_unbatched(gram, pref, norm_eps, reg_eps, each): UPGrad's (each) or DualProj's weights [T] "
    "of one plain CPU Gram matrix [T, T], with the checks of torch.ops.fastmtl.dual_cone_weights; None where the "
    "call must go through that op instead (not an exact CPU tensor, requires grad, functorch-wrapped, a dispatch "
    "mode active, T = 0, pref not a [T] tensor)."};

}  // namespace

void bind_unbatched_aggregation(py::module_& m) {
  PyObject* function = PyCFunction_NewEx(&dual_cone_weights_unbatched_def, nullptr, m.attr("__name__").ptr());
  if (function == nullptr) throw py::error_already_set();
  m.add_object("dual_cone_weights_unbatched", py::reinterpret_steal<py::object>(function));
}

}  // namespace fastmtl::binding
