// A Cholesky factor L (L L^T = A) of a symmetric positive definite matrix that grows one row and
// column at a time. The active-set solvers add one index per iteration; appending costs O(n^2)
// instead of refactoring in O(n^3), which is what makes the T problems of UPGrad at T = 40 cheap.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace fastmtl::cpu::aggregation {

class GrowingCholesky {
 public:
  explicit GrowingCholesky(int64_t capacity) : capacity_(capacity), factor_(capacity * capacity, 0.0) {}

  int64_t size() const { return size_; }
  void clear() { size_ = 0; }

  // Appends the row/column (column = A[members, new], diagonal = A[new, new]). Returns false and
  // leaves the factor unchanged when the new pivot is not above min_pivot: the new row is
  // numerically a combination of the members.
  bool append(const double* column, double diagonal, double min_pivot) {
    double* row = factor_.data() + size_ * capacity_;
    double pivot = diagonal;
    for (int64_t j = 0; j < size_; ++j) {
      const double* lj = factor_.data() + j * capacity_;
      double s = column[j];
      for (int64_t k = 0; k < j; ++k) s -= row[k] * lj[k];
      row[j] = s / lj[j];
      pivot -= row[j] * row[j];
    }
    if (!(pivot > min_pivot)) return false;
    row[size_] = std::sqrt(pivot);
    ++size_;
    return true;
  }

  // Solves A x = b in place (b holds size() entries).
  void solve(double* b) const {
    for (int64_t i = 0; i < size_; ++i) {
      const double* li = factor_.data() + i * capacity_;
      double s = b[i];
      for (int64_t k = 0; k < i; ++k) s -= li[k] * b[k];
      b[i] = s / li[i];
    }
    for (int64_t i = size_ - 1; i >= 0; --i) {
      double s = b[i];
      for (int64_t k = i + 1; k < size_; ++k) s -= factor_[k * capacity_ + i] * b[k];
      b[i] = s / factor_[i * capacity_ + i];
    }
  }

 private:
  int64_t capacity_;
  int64_t size_ = 0;
  std::vector<double> factor_;  // row-major, lower triangle used
};

}  // namespace fastmtl::cpu::aggregation
