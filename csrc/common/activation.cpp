#include "common/activation.h"

namespace fastmtl {

bool parse_activation(const std::string& name, Activation* out) {
  static const struct {
    const char* name;
    Activation act;
  } kTable[] = {
      {"relu", Activation::Relu}, {"gelu", Activation::Gelu}, {"gelu_tanh", Activation::GeluTanh},
      {"silu", Activation::Silu}, {"tanh", Activation::Tanh}, {"identity", Activation::Identity},
  };
  for (const auto& entry : kTable) {
    if (name == entry.name) {
      *out = entry.act;
      return true;
    }
  }
  return false;
}

const char* activation_names() { return "relu, gelu, gelu_tanh, silu, tanh, identity"; }

}  // namespace fastmtl
