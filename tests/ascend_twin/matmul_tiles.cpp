// Sample kernel + driver for the twin's Matmul high-level API (lib/matmul/matmul_intf.h): each block
// computes a band of rows of C = A * op(B) (+ bias) on the cube unit, with the tiling made on the
// host by matmul_tiling::MatmulApiTiling. tests/test_ascend_twin_matmul.py compares the output
// with torch.
//
//   matmul_tiles MODE DTYPE M N K LDA LDB TRANS_B BIAS CHIP BLOCK_DIM FIX_M FIX_N FIX_K DIR
//
// MODE  gm     IterateAll into C in GM
//       ub     Iterate + GetTensorC into a VECIN queue, then DataCopyPad of each block to GM
//       uba    A staged into a VECOUT queue (UB) first, IterateAll into GM
//       chain  two Matmul objects: S = A op(B) (float, GM workspace), End, then O = S D
// DTYPE f32 | f16 | bf16 (A and B); C, bias, D are float.
// A is DIR/a.bin [M, LDA] (the first K columns are used: a row stride > K, as for one head of
// q[T, H, D]); B is DIR/b.bin [K, LDB] (first N columns) or, with TRANS_B, [N, LDB] (first K
// columns); bias DIR/bias.bin [N]; D DIR/d.bin [N, K]. Output DIR/c.bin: [M, N] float ([M, K]
// for chain). FIX_* > 0 force base block sizes (SetFixSplit). Exit codes: 0 ok, 3 hardware rule
// violation, 4 tiling rejected.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "kernel_operator.h"
#include "lib/matmul/matmul_intf.h"
#include "tiling/tiling_api.h"

using namespace AscendC;

namespace {

struct Problem {
  std::string mode;
  int32_t m, n, k, lda, ldb;
  bool trans_b, bias;
  int32_t rows;  // rows of C per block
};

template <class T>
constexpr matmul_tiling::DataType HostType() {
  if constexpr (std::is_same_v<T, float>) return matmul_tiling::DataType::DT_FLOAT;
  if constexpr (std::is_same_v<T, half>) return matmul_tiling::DataType::DT_FLOAT16;
  return matmul_tiling::DataType::DT_BF16;
}

// -------------------------------- kernels ---------------------------------------------------

// Modes gm / ub / uba. A_POS: GM or VECOUT; C_POS: GM or VECIN.
template <class T, TPosition A_POS, TPosition C_POS, bool TRANS_B>
__global__ __aicore__ void matmul_rows(GM_ADDR a, GM_ADDR b, GM_ADDR bias, GM_ADDR c,
                                       GM_ADDR workspace, Problem p, TCubeTiling tiling) {
  using AType = MatmulType<A_POS, CubeFormat::ND, T>;
  using BType = MatmulType<TPosition::GM, CubeFormat::ND, T, TRANS_B>;
  using CType = MatmulType<C_POS, CubeFormat::ND, float>;
  using BiasType = MatmulType<TPosition::GM, CubeFormat::ND, float>;
  SetSysWorkspace(workspace);
  TPipe pipe;
  Matmul<AType, BType, CType, BiasType> mm;
  // In the kernel's own scope: the cube core serves here and returns.
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);

  const int32_t m0 = static_cast<int32_t>(GetBlockIdx()) * p.rows;
  const int32_t rows = std::min(p.rows, p.m - m0);
  if (rows <= 0) return;
  const int32_t org_n = TRANS_B ? p.n : p.ldb;   // B row stride when not transposed
  const int32_t org_kb = TRANS_B ? p.ldb : p.k;  // B row stride when transposed

  GlobalTensor<T> a_gm, b_gm;
  GlobalTensor<float> bias_gm, c_gm;
  a_gm.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(a) + int64_t(m0) * p.lda,
                       uint64_t(rows) * p.lda);
  b_gm.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(b),
                       uint64_t(TRANS_B ? p.n : p.k) * p.ldb);
  bias_gm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(bias), p.n);
  c_gm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(c) + int64_t(m0) * p.n,
                       uint64_t(rows) * p.n);

  TQue<TPosition::VECOUT, 1> a_que;
  TQue<TPosition::VECIN, 1> c_que;
  LocalTensor<T> a_local;
  if constexpr (A_POS == TPosition::VECOUT) {
    // Rows land 32-byte aligned in UB, so the UB copy of A has row stride k_pitch >= K: told to
    // the Matmul through orgKa, exactly like a strided A in GM.
    const int32_t k_pitch = static_cast<int32_t>(twin::detail::AlignUp32(p.k * sizeof(T)) /
                                                 sizeof(T));
    pipe.InitBuffer(a_que, 1, uint32_t(rows) * k_pitch * sizeof(T));
    a_local = a_que.AllocTensor<T>();
    DataCopyExtParams copy(static_cast<uint16_t>(rows), uint32_t(p.k * sizeof(T)),
                           uint32_t((p.lda - p.k) * sizeof(T)), 0, 0);
    DataCopyPad(a_local, a_gm, copy, DataCopyPadExtParams<T>());
    a_que.EnQue(a_local);
    a_local = a_que.DeQue<T>();
    mm.SetOrgShape(rows, org_n, k_pitch, org_kb, p.n);
  } else {
    mm.SetOrgShape(rows, org_n, p.lda, org_kb, p.n);
  }
  mm.SetSingleShape(rows, p.n, p.k);
  if constexpr (A_POS == TPosition::VECOUT) {
    mm.SetTensorA(a_local);
  } else {
    mm.SetTensorA(a_gm);
  }
  mm.SetTensorB(b_gm, TRANS_B);
  if (p.bias) {
    mm.SetBias(bias_gm);
  } else {
    mm.DisableBias();
  }

  if constexpr (C_POS == TPosition::GM) {
    mm.IterateAll(c_gm);
  } else {
    // Blocks come in the tiling's iterateOrder; the kernel mirrors it to place each one.
    pipe.InitBuffer(c_que, 1, uint32_t(tiling.baseM) * tiling.baseN * sizeof(float));
    const int32_t m_iter = (rows + tiling.baseM - 1) / tiling.baseM;
    const int32_t n_iter = (p.n + tiling.baseN - 1) / tiling.baseN;
    for (int32_t i = 0; i < m_iter * n_iter; ++i) {
      const int32_t mi = tiling.iterateOrder == 0 ? i % m_iter : i / n_iter;
      const int32_t ni = tiling.iterateOrder == 0 ? i / m_iter : i % n_iter;
      if (!mm.Iterate()) break;
      LocalTensor<float> block = c_que.AllocTensor<float>();
      mm.GetTensorC(block);
      c_que.EnQue(block);
      block = c_que.DeQue<float>();
      const int32_t cur_m = std::min(tiling.baseM, rows - mi * tiling.baseM);
      const int32_t cur_n = std::min(tiling.baseN, p.n - ni * tiling.baseN);
      const uint32_t row_bytes = uint32_t(cur_n) * sizeof(float);
      // UB rows have pitch baseN floats; skip the rest of each row in 32-byte blocks.
      DataCopyExtParams out(static_cast<uint16_t>(cur_m), row_bytes,
                            uint32_t((tiling.baseN * sizeof(float) -
                                      twin::detail::AlignUp32(row_bytes)) / 32u),
                            uint32_t((p.n - cur_n) * sizeof(float)), 0);
      DataCopyPad(c_gm[uint64_t(mi) * tiling.baseM * p.n + uint64_t(ni) * tiling.baseN], block,
                  out);
      c_que.FreeTensor(block);
    }
    if (mm.Iterate()) {  // every block was consumed: the next Iterate must report the end
      twin::detail::Violate("matmul-protocol", "matmul_tiles", "Iterate produced extra blocks");
    }
  }
  if constexpr (A_POS == TPosition::VECOUT) a_que.FreeTensor(a_local);
  mm.End();
}

// Mode chain: S = A op(B) into a float GM workspace, then O = S D; two objects, End between.
template <class T, bool TRANS_B>
__global__ __aicore__ void matmul_chain(GM_ADDR a, GM_ADDR b, GM_ADDR d, GM_ADDR s, GM_ADDR o,
                                        GM_ADDR workspace, Problem p, TCubeTiling t1,
                                        TCubeTiling t2) {
  using In = MatmulType<TPosition::GM, CubeFormat::ND, T>;
  using InB = MatmulType<TPosition::GM, CubeFormat::ND, T, TRANS_B>;
  using F32 = MatmulType<TPosition::GM, CubeFormat::ND, float>;
  SetSysWorkspace(workspace);
  TPipe pipe;
  Matmul<In, InB, F32> mm1;
  Matmul<F32, F32, F32> mm2;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm1, &t1, mm2, &t2);

  const int32_t m0 = static_cast<int32_t>(GetBlockIdx()) * p.rows;
  const int32_t rows = std::min(p.rows, p.m - m0);
  if (rows <= 0) return;
  GlobalTensor<T> a_gm, b_gm;
  GlobalTensor<float> d_gm, s_gm, o_gm;
  a_gm.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(a) + int64_t(m0) * p.lda,
                       uint64_t(rows) * p.lda);
  b_gm.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(b), uint64_t(TRANS_B ? p.n : p.k) * p.ldb);
  d_gm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(d), uint64_t(p.n) * p.k);
  s_gm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(s) + int64_t(m0) * p.n,
                       uint64_t(rows) * p.n);
  o_gm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(o) + int64_t(m0) * p.k,
                       uint64_t(rows) * p.k);

  mm1.SetOrgShape(rows, TRANS_B ? p.n : p.ldb, p.lda, TRANS_B ? p.ldb : p.k, p.n);
  mm1.SetSingleShape(rows, p.n, p.k);
  mm1.SetTensorA(a_gm);
  mm1.SetTensorB(b_gm, TRANS_B);
  mm1.IterateAll(s_gm);
  mm1.End();

  mm2.SetOrgShape(rows, p.k, p.n);
  mm2.SetSingleShape(rows, p.k, p.n);
  mm2.SetTensorA(s_gm);
  mm2.SetTensorB(d_gm);
  mm2.IterateAll(o_gm);
  mm2.End();
}

// -------------------------------- host ------------------------------------------------------

std::vector<char> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

// Host tiling for one Matmul: (rows x n x k) per core, original shape (org_m, org_n, ka, kb).
template <class T>
bool MakeTiling(const platform_ascendc::PlatformAscendC& platform, matmul_tiling::TPosition a_pos,
                matmul_tiling::TPosition c_pos, bool trans_b, bool bias, int32_t rows, int32_t n,
                int32_t k, int32_t org_m, int32_t org_n, int32_t ka, int32_t kb,
                const int32_t fix[3], TCubeTiling& out) {
  namespace mt = matmul_tiling;
  mt::MatmulApiTiling tiling(platform);
  tiling.SetAType(a_pos, mt::CubeFormat::ND, HostType<T>());
  tiling.SetBType(mt::TPosition::GM, mt::CubeFormat::ND, HostType<T>(), trans_b);
  tiling.SetCType(c_pos, mt::CubeFormat::ND, mt::DataType::DT_FLOAT);
  tiling.SetBiasType(mt::TPosition::GM, mt::CubeFormat::ND, mt::DataType::DT_FLOAT);
  tiling.SetShape(rows, n, k);
  tiling.SetOrgShape(org_m, org_n, ka, kb);
  tiling.SetBias(bias);
  tiling.SetBufferSpace(-1, -1, -1);
  tiling.SetFixSplit(fix[0], fix[1], fix[2]);
  return tiling.GetTiling(out) != -1;
}

template <class T, bool TRANS_B>
int Run(const Problem& p, twin::Chip chip, uint32_t block_dim, const int32_t fix[3],
        const std::string& dir) {
  // block_dim vector blocks split the rows; a 910B MIX kernel has two per cube block.
  const twin::LaunchOptions mix{twin::KernelType::Mix};
  const uint32_t cube_blocks = chip == twin::Chip::Ascend910B ? (block_dim + 1) / 2 : block_dim;
  auto* platform = platform_ascendc::PlatformAscendCManager::GetInstance(
      chip == twin::Chip::Ascend910B ? "Ascend910B1" : "Ascend310B1");
  using HostPos = matmul_tiling::TPosition;
  const bool ub_a = p.mode == "uba", ub_c = p.mode == "ub";
  const int32_t org_n = TRANS_B ? p.n : p.ldb, org_kb = TRANS_B ? p.ldb : p.k;
  TCubeTiling t1{}, t2{};
  bool ok = MakeTiling<T>(*platform, ub_a ? HostPos::VECOUT : HostPos::GM,
                          ub_c ? HostPos::VECIN : HostPos::GM, TRANS_B, p.bias, p.rows, p.n, p.k,
                          p.m, org_n, p.lda, org_kb, fix, t1);
  if (ok && p.mode == "chain") {
    const int32_t no_fix[3] = {-1, -1, -1};
    ok = MakeTiling<float>(*platform, HostPos::GM, HostPos::GM, false, false, p.rows, p.k, p.n,
                           p.m, p.k, p.n, p.n, no_fix, t2);
  }
  if (!ok) {
    std::cout << "TILING_ERROR" << std::endl;
    return 4;
  }
  std::vector<char> a = ReadFile(dir + "/a.bin"), b = ReadFile(dir + "/b.bin");
  std::vector<char> bias = ReadFile(dir + "/bias.bin");
  std::vector<float> c(size_t(p.m) * p.n, -12345.0f);  // sentinel: unwritten C is visible
  std::vector<uint8_t> workspace(platform->GetLibApiWorkSpaceSize() / 1024u);
  auto gm = [](auto& v) { return reinterpret_cast<GM_ADDR>(v.data()); };
  try {
    if (p.mode == "chain") {
      std::vector<char> d = ReadFile(dir + "/d.bin");
      std::vector<float> o(size_t(p.m) * p.k, -12345.0f);
      twin::Launch(cube_blocks, chip, mix, matmul_chain<T, TRANS_B>, gm(a), gm(b), gm(d), gm(c),
                   gm(o), gm(workspace), p, t1, t2);
      c.swap(o);
    } else if (ub_a) {
      twin::Launch(cube_blocks, chip, mix,
                   matmul_rows<T, TPosition::VECOUT, TPosition::GM, TRANS_B>, gm(a), gm(b), gm(bias), gm(c), gm(workspace), p, t1);
    } else if (ub_c) {
      twin::Launch(cube_blocks, chip, mix,
                   matmul_rows<T, TPosition::GM, TPosition::VECIN, TRANS_B>, gm(a), gm(b), gm(bias), gm(c), gm(workspace), p, t1);
    } else {
      twin::Launch(cube_blocks, chip, mix, matmul_rows<T, TPosition::GM, TPosition::GM, TRANS_B>,
                   gm(a), gm(b), gm(bias), gm(c), gm(workspace), p, t1);
    }
  } catch (const twin::HardwareRuleViolation& e) {
    std::cout << "VIOLATION rule=" << e.rule() << " what=" << e.what() << std::endl;
    return 3;
  }
  std::ofstream out(dir + "/c.bin", std::ios::binary);
  out.write(reinterpret_cast<const char*>(c.data()), std::streamsize(c.size() * sizeof(float)));
  std::cout << "OK baseM=" << t1.baseM << " baseN=" << t1.baseN << " baseK=" << t1.baseK
            << " stepKa=" << t1.stepKa << " depthA1=" << t1.depthA1 << std::endl;
  return 0;
}

template <class T>
int RunTyped(const Problem& p, twin::Chip chip, uint32_t block_dim, const int32_t fix[3],
             const std::string& dir) {
  return p.trans_b ? Run<T, true>(p, chip, block_dim, fix, dir)
                   : Run<T, false>(p, chip, block_dim, fix, dir);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 16) {
    std::cerr << "usage: matmul_tiles MODE DTYPE M N K LDA LDB TRANS_B BIAS CHIP BLOCK_DIM "
                 "FIX_M FIX_N FIX_K DIR\n";
    return 2;
  }
  Problem p;
  p.mode = argv[1];
  const std::string dtype = argv[2];
  p.m = std::stoi(argv[3]);
  p.n = std::stoi(argv[4]);
  p.k = std::stoi(argv[5]);
  p.lda = std::stoi(argv[6]);
  p.ldb = std::stoi(argv[7]);
  p.trans_b = std::stoi(argv[8]) != 0;
  p.bias = std::stoi(argv[9]) != 0;
  const twin::Chip chip =
      std::string(argv[10]) == "310b" ? twin::Chip::Ascend310B : twin::Chip::Ascend910B;
  const uint32_t block_dim = static_cast<uint32_t>(std::stoul(argv[11]));
  const int32_t fix[3] = {std::stoi(argv[12]), std::stoi(argv[13]), std::stoi(argv[14])};
  const std::string dir = argv[15];
  p.rows = (p.m + int32_t(block_dim) - 1) / int32_t(block_dim);
  if (dtype == "f32") return RunTyped<float>(p, chip, block_dim, fix, dir);
  if (dtype == "f16") return RunTyped<half>(p, chip, block_dim, fix, dir);
  if (dtype == "bf16") return RunTyped<bfloat16_t>(p, chip, block_dim, fix, dir);
  std::cerr << "unknown dtype " << dtype << "\n";
  return 2;
}
