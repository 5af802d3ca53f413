// Routed attention forward on the CPU, float32: every (query region, head, block of query rows) reads its
// routed key and value regions in place (no routed copy; small regions through a per-thread buffer) with
// BLAS products, and an exact softmax over all routed keys in between. Built on first use by
// bilevel/ops/backends/fused_cpu.py.
//
// query   (B, Tq, H * D)   channel stride 1, any token and batch strides
// key     (R, Tk, H * D)   channel stride 1; R regions of all images, indices point into them
// value   (R, Tk, H * Dv)  channel stride 1
// indices (B, topk) int64  routed regions of each query region
// weights (B, topk) or none: factors on the routed keys and values (soft routing)
// returns out (B, Tq, H * Dv) and the log-sum-exp of the scaled scores (B, H, Tq)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

// The BLAS PyTorch links (MKL on x86-64 wheels, OpenBLAS elsewhere); column-major, 32-bit sizes.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr int64_t kQueryBlock = 64;
// Key regions of fewer tokens are packed per query region and head (see routed_attention_forward).
constexpr int64_t kPackBelowKeyTokens = 32;
// Query regions of at most this many tokens, with such key regions and heads of at least kSmallProductMinDim
// channels, multiply in registers (small_scores, small_values) instead of BLAS.
constexpr int64_t kSmallProductRows = 9;
constexpr int64_t kSmallProductMinDim = 32;

// Consecutive routed keys of one head, read as a BLAS operand: tokens rows, row strides in floats.
struct KeySegment {
  const float* key;
  int64_t key_stride;
  const float* value;
  int64_t value_stride;
  int64_t tokens;
  float factor;      // region weight (1 when packed: the copy carries it)
};

#if defined(__AVX2__) && defined(__FMA__)
// exp(x) of 8 floats x <= 0 (scores minus their row maximum): 2^n e^r with n = round(x / ln 2), r = x - n ln 2 in
// [-ln 2 / 2, ln 2 / 2] (ln 2 in two parts), e^r by Cephes' degree-6 polynomial; 1 ulp. Below -87 (where e^x
// leaves the normal range) it gives 0; NaN stays NaN. About 1.4x the speed of the vectorized libm expf.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.f);
  const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  const __m256 clamped = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(two_to_n)));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

constexpr int64_t kLanes = 8;

// The 8-lane sums of eight vectors, as one vector.
inline __m256 sum_each(const __m256* v) {
  const __m256 pairs01 = _mm256_hadd_ps(v[0], v[1]), pairs23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 pairs45 = _mm256_hadd_ps(v[4], v[5]), pairs67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 quads0123 = _mm256_hadd_ps(pairs01, pairs23), quads4567 = _mm256_hadd_ps(pairs45, pairs67);
  return _mm256_add_ps(_mm256_permute2f128_ps(quads0123, quads4567, 0x20),
                       _mm256_permute2f128_ps(quads0123, quads4567, 0x31));
}

// scores[r * score_stride + t] = alpha * q_r . keys[t] for rows r < rows and keys t < count (a multiple of 8: keys
// holds that many row pointers, the extra ones to zeros), dim a multiple of 8. Key rows are read where they lie:
// for products of a few query rows, where a BLAS call or a packed copy costs more than the arithmetic.
void small_scores(const float* q, int64_t q_stride, int64_t rows, const float* const* keys, int64_t count,
                  int64_t dim, float alpha, float* scores, int64_t score_stride) {
  const __m256 scale = _mm256_set1_ps(alpha);
  for (int64_t first = 0; first < count; first += kLanes) {
    const float* const* group = keys + first;
    for (int64_t r = 0; r < rows; ++r) {
      const float* q_row = q + r * q_stride;
      __m256 acc[kLanes];
      for (int j = 0; j < kLanes; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t c = 0; c < dim; c += kLanes) {
        const __m256 query_part = _mm256_loadu_ps(q_row + c);
        for (int j = 0; j < kLanes; ++j) acc[j] = _mm256_fmadd_ps(query_part, _mm256_loadu_ps(group[j] + c), acc[j]);
      }
      _mm256_storeu_ps(scores + r * score_stride + first, _mm256_mul_ps(sum_each(acc), scale));
    }
  }
}

// out[r * out_stride + d] = sum_t p[r * p_stride + t] * values[t][d] / row_sums[r] for t < count and d < dim (a
// multiple of 8), value rows read where they lie; two rows and 32 channels per pass (eight accumulators, enough
// independent sums to keep both FMA units busy).
void small_values(const float* p, int64_t p_stride, int64_t rows, const float* const* values, int64_t count,
                  int64_t dim, const float* row_sums, float* out, int64_t out_stride) {
  constexpr int kChunks = 4;
  for (int64_t first = 0; first < dim; first += kChunks * kLanes) {
    const int64_t chunks = std::min<int64_t>(kChunks, (dim - first) / kLanes);
    for (int64_t r = 0; r < rows; r += 2) {
      const bool pair = r + 1 < rows;
      const float* p0 = p + r * p_stride;
      const float* p1 = pair ? p0 + p_stride : p0;
      __m256 acc0[kChunks], acc1[kChunks];
      for (int j = 0; j < kChunks; ++j) acc0[j] = acc1[j] = _mm256_setzero_ps();
      for (int64_t t = 0; t < count; ++t) {
        const __m256 weight0 = _mm256_set1_ps(p0[t]), weight1 = _mm256_set1_ps(p1[t]);
        const float* value_row = values[t] + first;
        for (int j = 0; j < chunks; ++j) {
          const __m256 part = _mm256_loadu_ps(value_row + j * kLanes);
          acc0[j] = _mm256_fmadd_ps(weight0, part, acc0[j]);
          acc1[j] = _mm256_fmadd_ps(weight1, part, acc1[j]);
        }
      }
      const __m256 inverse0 = _mm256_set1_ps(1.f / row_sums[r]);
      const __m256 inverse1 = _mm256_set1_ps(pair ? 1.f / row_sums[r + 1] : 0.f);
      for (int j = 0; j < chunks; ++j) {
        _mm256_storeu_ps(out + r * out_stride + first + j * kLanes, _mm256_mul_ps(acc0[j], inverse0));
        if (pair) _mm256_storeu_ps(out + (r + 1) * out_stride + first + j * kLanes, _mm256_mul_ps(acc1[j], inverse1));
      }
    }
  }
}
#endif

// row[t] = exp(row[t] - row_max) for t < n; returns their sum.
float exponentiate(float* row, int64_t n, float row_max) {
  int64_t t = 0;
  float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 shift = _mm256_set1_ps(row_max);
  __m256 sums = _mm256_setzero_ps();
  for (; t + kLanes <= n; t += kLanes) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + t), shift));
    _mm256_storeu_ps(row + t, e);
    sums = _mm256_add_ps(sums, e);
  }
  float lanes[kLanes];
  _mm256_storeu_ps(lanes, sums);
  for (float lane : lanes) sum += lane;
#endif
  for (; t < n; ++t) {
    row[t] = std::exp(row[t] - row_max);
    sum += row[t];
  }
  return sum;
}

// The softmax numerators of `rows` rows of `count` scores (row stride `stride`), in place: exp(score - row max);
// row_sums[r] gets each row's sum, log_sum_exp[r] the log-sum-exp of its scores.
void exponentiate_rows(float* scores, int64_t rows, int64_t count, int64_t stride, float* row_sums,
                       float* log_sum_exp) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * stride;
    float row_max = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < count; ++t) row_max = std::max(row_max, row[t]);
    row_sums[r] = exponentiate(row, count, row_max);
    log_sum_exp[r] = row_max + std::log(row_sums[r]);
  }
}

void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  sgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 3,
              "routed_attention_forward: ", name, " must be a 3-d float32 CPU tensor");
  TORCH_CHECK(t.stride(2) == 1, "routed_attention_forward: ", name, " needs channel stride 1");
  TORCH_CHECK(t.stride(0) < std::numeric_limits<int>::max() && t.stride(1) < std::numeric_limits<int>::max(),
              "routed_attention_forward: ", name, " is too large for 32-bit BLAS strides");
}

std::tuple<at::Tensor, at::Tensor> routed_attention_forward(const at::Tensor& query, const at::Tensor& key,
                                                            const at::Tensor& value, const at::Tensor& indices,
                                                            const std::optional<at::Tensor>& weights,
                                                            double scale, int64_t num_heads) {
  check_operand(query, "query");
  check_operand(key, "key");
  check_operand(value, "value");
  const int64_t batch = query.size(0), query_tokens = query.size(1), channels = query.size(2);
  const int64_t regions = key.size(0), key_tokens = key.size(1), value_channels = value.size(2);
  TORCH_CHECK(key.size(2) == channels && value.size(0) == regions && value.size(1) == key_tokens,
              "routed_attention_forward: key and value must be (R, Tk, C) and (R, Tk, Cv) with C of query");
  TORCH_CHECK(num_heads > 0 && channels % num_heads == 0 && value_channels % num_heads == 0,
              "routed_attention_forward: channels must be divisible by num_heads");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == batch &&
                  indices.is_contiguous(),
              "routed_attention_forward: indices must be contiguous int64 (B, topk)");
  const int64_t topk = indices.size(1);
  TORCH_CHECK(topk > 0 && key_tokens > 0, "routed_attention_forward: needs at least one routed region of at least "
              "one token; got topk=", topk, " and ", key_tokens, " tokens per key region");
  const int64_t* routed = indices.data_ptr<int64_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK(routed[i] >= 0 && routed[i] < regions, "routed_attention_forward: index ", routed[i],
                " is outside the ", regions, " key regions");
  }
  const float* factors = nullptr;
  if (weights.has_value()) {
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->is_contiguous() &&
                    weights->sizes() == indices.sizes(),
                "routed_attention_forward: weights must be contiguous float32 shaped like indices");
    factors = weights->data_ptr<float>();
  }

  const int64_t head_dim = channels / num_heads, value_head_dim = value_channels / num_heads;
  const int64_t routed_tokens = topk * key_tokens;
  const int64_t query_blocks = (query_tokens + kQueryBlock - 1) / kQueryBlock;
  auto out = at::empty({batch, query_tokens, value_channels}, query.options());
  auto log_sum_exp = at::empty({batch, num_heads, query_tokens}, query.options());
  const float* q = query.data_ptr<float>();
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* lse = log_sum_exp.data_ptr<float>();
  const float alpha = static_cast<float>(scale);

  // Small key regions are first copied, for one query region and head, into a packed buffer (scaled by their
  // region weights): one product over all routed keys then replaces topk products of a few rows each. With few
  // query rows too, the products run in registers on the regions in place (no BLAS call, no copy).
  const bool few_tokens = key_tokens < kPackBelowKeyTokens;
#if defined(__AVX2__) && defined(__FMA__)
  const bool in_registers = few_tokens && query_tokens <= kSmallProductRows && factors == nullptr &&
                            head_dim >= kSmallProductMinDim && head_dim % kLanes == 0 && value_head_dim % kLanes == 0;
#else
  const bool in_registers = false;
#endif
  const bool pack = few_tokens && !in_registers;
  // score rows padded to whole vectors for the register path (the extra keys point to a row of zeros)
  const int64_t score_stride = in_registers ? (routed_tokens + kLanes - 1) / kLanes * kLanes : routed_tokens;
  at::parallel_for(0, batch * num_heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(std::min(kQueryBlock, query_tokens) * score_stride);   // rows x routed keys
    std::vector<float> row_sums(kQueryBlock);
    std::vector<float> zeros(in_registers ? head_dim : 0);
    std::vector<const float*> key_rows(in_registers ? score_stride : 0, zeros.data());
    std::vector<const float*> value_rows(in_registers ? routed_tokens : 0);
    std::vector<float> packed_key(pack ? routed_tokens * head_dim : 0);
    std::vector<float> packed_value(pack ? routed_tokens * value_head_dim : 0);
    std::vector<KeySegment> segments;
    int64_t packed_for = -1;                       // the (query region, head) packed_key and packed_value hold
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (num_heads * query_blocks);
      const int64_t head = item / query_blocks % num_heads;
      const int64_t first_row = item % query_blocks * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, query_tokens - first_row);
      const float* q_block = q + b * query.stride(0) + first_row * query.stride(1) + head * head_dim;
      float* lse_block = lse + (b * num_heads + head) * query_tokens + first_row;
      float* out_block = o + (b * query_tokens + first_row) * value_channels + head * value_head_dim;
#if defined(__AVX2__) && defined(__FMA__)
      if (in_registers) {
        for (int64_t j = 0; j < topk; ++j) {
          const int64_t region = routed[b * topk + j];
          for (int64_t t = 0; t < key_tokens; ++t) {
            key_rows[j * key_tokens + t] = k + region * key.stride(0) + t * key.stride(1) + head * head_dim;
            value_rows[j * key_tokens + t] = v + region * value.stride(0) + t * value.stride(1) + head * value_head_dim;
          }
        }
        small_scores(q_block, query.stride(1), rows, key_rows.data(), score_stride, head_dim, alpha, scores.data(),
                     score_stride);
        exponentiate_rows(scores.data(), rows, routed_tokens, score_stride, row_sums.data(), lse_block);
        small_values(scores.data(), score_stride, rows, value_rows.data(), routed_tokens, value_head_dim,
                     row_sums.data(), out_block, value_channels);
        continue;
      }
#endif
      if (!pack) {
        segments.clear();
        for (int64_t j = 0; j < topk; ++j) {
          const int64_t region = routed[b * topk + j];
          segments.push_back({k + region * key.stride(0) + head * head_dim, key.stride(1),
                              v + region * value.stride(0) + head * value_head_dim, value.stride(1), key_tokens,
                              factors ? factors[b * topk + j] : 1.f});
        }
      } else if (packed_for != item / query_blocks) {
        packed_for = item / query_blocks;
        for (int64_t j = 0; j < topk; ++j) {
          const int64_t region = routed[b * topk + j];
          const float factor = factors ? factors[b * topk + j] : 1.f;
          for (int64_t t = 0; t < key_tokens; ++t) {
            const float* key_row = k + region * key.stride(0) + t * key.stride(1) + head * head_dim;
            const float* value_row = v + region * value.stride(0) + t * value.stride(1) + head * value_head_dim;
            float* key_copy = packed_key.data() + (j * key_tokens + t) * head_dim;
            float* value_copy = packed_value.data() + (j * key_tokens + t) * value_head_dim;
            for (int64_t c = 0; c < head_dim; ++c) key_copy[c] = factor * key_row[c];
            for (int64_t c = 0; c < value_head_dim; ++c) value_copy[c] = factor * value_row[c];
          }
        }
        segments = {{packed_key.data(), head_dim, packed_value.data(), value_head_dim, routed_tokens, 1.f}};
      }
      // scores[r, s + t] = scale * w * q_r . k_t of the segment starting at routed key s (column-major:
      // scoresᵀ = K qᵀ)
      int64_t first_key = 0;
      for (const KeySegment& segment : segments) {
        gemm('T', 'N', segment.tokens, rows, head_dim, alpha * segment.factor, segment.key, segment.key_stride,
             q_block, query.stride(1), 0.f, scores.data() + first_key, routed_tokens);
        first_key += segment.tokens;
      }
      exponentiate_rows(scores.data(), rows, routed_tokens, routed_tokens, row_sums.data(), lse_block);
      // out rows = sum over segments of w * P V (column-major: outᵀ = Vᵀ Pᵀ), then divided by the row sums
      first_key = 0;
      for (const KeySegment& segment : segments) {
        gemm('N', 'N', value_head_dim, rows, segment.tokens, segment.factor, segment.value, segment.value_stride,
             scores.data() + first_key, routed_tokens, first_key ? 1.f : 0.f, out_block, value_channels);
        first_key += segment.tokens;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float inverse = 1.f / row_sums[r];
        float* out_row = out_block + r * value_channels;
        for (int64_t c = 0; c < value_head_dim; ++c) out_row[c] *= inverse;
      }
    }
  });
  return {out, log_sum_exp};
}

}  // namespace

TORCH_LIBRARY(bilevel, m) {
  m.def("routed_attention_forward(Tensor query, Tensor key, Tensor value, Tensor indices, Tensor? weights, "
        "float scale, int num_heads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bilevel, CPU, m) {
  m.impl("routed_attention_forward", TORCH_FN(routed_attention_forward));
}
