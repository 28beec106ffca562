// A Cholesky factor L (L L^T = A) of a symmetric positive definite matrix that grows one row and
// column at a time. The active-set solvers add one index per iteration; appending costs O(n^2)
// instead of refactoring in O(n^3), which is what makes the T problems of UPGrad at T = 40 cheap.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/aggregation/dense.h"

namespace fastmtl::cpu::aggregation {

class GrowingCholesky {
 public:
  explicit GrowingCholesky(int64_t capacity)
      : capacity_(capacity), factor_(capacity * capacity, 0.0), inverse_diagonal_(capacity, 0.0) {}

  int64_t size() const { return size_; }
  void clear() { size_ = 0; }

  // Appends the row/column (column = A[members, new], diagonal = A[new, new]). Returns false and
  // leaves the factor unchanged when the new pivot is not above min_pivot: the new row is
  // numerically a combination of the members.
  bool append(const double* column, double diagonal, double min_pivot) {
    double* row = factor_.data() + size_ * capacity_;
    for (int64_t j = 0; j < size_; ++j)
      row[j] = (column[j] - dot(row, factor_.data() + j * capacity_, j)) * inverse_diagonal_[j];
    const double pivot = diagonal - dot(row, row, size_);
    if (!(pivot > min_pivot)) return false;
    row[size_] = std::sqrt(pivot);
    inverse_diagonal_[size_] = 1.0 / row[size_];
    ++size_;
    return true;
  }

  // Solves A x = b in place (b holds size() entries).
  void solve(double* b) const {
    for (int64_t i = 0; i < size_; ++i)
      b[i] = (b[i] - dot(factor_.data() + i * capacity_, b, i)) * inverse_diagonal_[i];
    for (int64_t i = size_ - 1; i >= 0; --i) {
      double s = b[i];
      for (int64_t k = i + 1; k < size_; ++k) s -= factor_[k * capacity_ + i] * b[k];
      b[i] = s * inverse_diagonal_[i];
    }
  }

 private:
  int64_t capacity_;
  int64_t size_ = 0;
  std::vector<double> factor_;  // row-major, lower triangle used
  std::vector<double> inverse_diagonal_;
};

// A Cholesky factorisation A = U^T U computed from scratch, right-looking: every step is a row
// scaling and rank-1 updates of contiguous rows, independent operations the compiler vectorises,
// where the row-by-row (left-looking) form of GrowingCholesky waits on one dot product after
// another. About 5x faster at n = 20 (measured), which matters to the pivoting solver that
// refactors every round.
class DenseCholesky {
 public:
  DenseCholesky() = default;

  // The symmetric matrix to factor, row-major [n, n] (its upper triangle is read): fill it through
  // matrix(), then factor(). The storage grows to the largest n asked for and is never zeroed: a
  // solver that only ever factors small free sets of a large problem does not pay for T x T.
  double* matrix(int64_t n) {
    n_ = n;
    if (upper_.size() < static_cast<size_t>(n * n)) upper_.resize(n * n);
    return upper_.data();
  }

  // Overwrites the upper triangle with U. False if a pivot is not positive.
  bool factor() {
    double* a = upper_.data();
    for (int64_t k = 0; k < n_; ++k) {
      double* row_k = a + k * n_;
      if (!(row_k[k] > 0.0)) return false;
      const double d = std::sqrt(row_k[k]);
      const double inv = 1.0 / d;
      row_k[k] = d;
      for (int64_t j = k + 1; j < n_; ++j) row_k[j] *= inv;
      for (int64_t i = k + 1; i < n_; ++i) {
        double* row_i = a + i * n_;
        const double f = row_k[i];
        for (int64_t j = i; j < n_; ++j) row_i[j] -= f * row_k[j];
      }
    }
    return true;
  }

  // Solves A x = b in place (b holds n entries): U^T y = b column by column, then U x = y.
  void solve(double* b) const {
    const double* a = upper_.data();
    for (int64_t k = 0; k < n_; ++k) {
      const double* row_k = a + k * n_;
      b[k] /= row_k[k];
      const double y = b[k];
      for (int64_t i = k + 1; i < n_; ++i) b[i] -= row_k[i] * y;
    }
    for (int64_t k = n_ - 1; k >= 0; --k) {
      const double* row_k = a + k * n_;
      b[k] = (b[k] - dot(row_k + k + 1, b + k + 1, n_ - k - 1)) / row_k[k];
    }
  }

 private:
  std::vector<double> upper_;
  int64_t n_ = 0;
};

}  // namespace fastmtl::cpu::aggregation
