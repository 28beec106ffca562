// Parsing of the (losses, num_outputs) lists that describe the tasks of the head ops.
#pragma once

#include <string>
#include <vector>

#include "common/loss.h"
#include "ops/checks.h"

namespace fastmtl::ops {

struct TaskLayout {
  std::vector<HeadTask> tasks;
  int64_t logit_cols = 0;   // sum of num_outputs
  int64_t target_cols = 0;  // sum of target widths
};

inline TaskLayout parse_task_layout(const char* op, const std::vector<std::string>& losses,
                                    c10::ArrayRef<int64_t> num_outputs) {
  TORCH_CHECK_VALUE(!losses.empty(), "fastmtl.", op, ": argument 'losses' expected at least one task, got 0");
  TORCH_CHECK_VALUE(num_outputs.size() == losses.size(), "fastmtl.", op, ": argument 'num_outputs' expected ",
                    losses.size(), " entries (one per task in 'losses'), got ", num_outputs.size());
  TaskLayout layout;
  layout.tasks.reserve(losses.size());
  for (size_t t = 0; t < losses.size(); ++t) {
    LossKind loss;
    const std::string& name = losses[t];
    TORCH_CHECK_VALUE(parse_loss(name, &loss), "fastmtl.", op, ": argument 'losses[", t, "]' expected one of ",
                      loss_names(), ", got '", name, "'");
    const int64_t n = num_outputs[t];
    TORCH_CHECK_VALUE(n >= 1, "fastmtl.", op, ": argument 'num_outputs[", t, "]' expected >= 1, got ", n);
    TORCH_CHECK_VALUE(loss != LossKind::Bce || n == 1, "fastmtl.", op, ": argument 'num_outputs[", t,
                      "]' expected 1 for a bce (binary) task, got ", n);
    layout.tasks.push_back(HeadTask{loss, n, layout.logit_cols, layout.target_cols});
    layout.logit_cols += n;
    layout.target_cols += target_width(loss, n);
  }
  return layout;
}

}  // namespace fastmtl::ops
