#include "common/loss.h"

namespace fastmtl {

bool parse_loss(const std::string& name, LossKind* out) {
  static const struct {
    const char* name;
    LossKind loss;
  } kTable[] = {
      {"mse", LossKind::Mse}, {"l1", LossKind::L1}, {"huber", LossKind::Huber},
      {"bce", LossKind::Bce}, {"ce", LossKind::Ce},
  };
  for (const auto& entry : kTable) {
    if (name == entry.name) {
      *out = entry.loss;
      return true;
    }
  }
  return false;
}

const char* loss_names() { return "mse, l1, huber, bce, ce"; }

const char* expected_target(LossKind loss) {
  switch (loss) {
    case LossKind::Bce:
      return "a probability in [0, 1] (soft labels allowed; NaN = missing)";
    case LossKind::Ce:
      return "a class index in [0, num_outputs) or -100 (missing)";
    default:
      return "a finite value (NaN = missing)";
  }
}

}  // namespace fastmtl
