// Test driver of the packed causal attention backward (csrc/ascend/packed_attention_bwd.h) on the
// CPU twin: reads the inputs tests/test_ascend_packed_attention_bwd.py wrote, makes the tiling
// with MakePackedAttentionBwdTiling for the chip, launches the dQ pass then the dK/dV pass on one
// GM workspace of PackedAttentionBwdWorkspaceBytes, and writes the gradients.
//
// usage: packed_attention_bwd MODE f32|bf16|f16 T B HQ HKV D SCALE 910b|310b MAX_BLOCKS MAX_TILE
//                             IN_DIR OUT
//   MODE run: the kernels as the host would launch them.
//   MODE bad-cube-tiling: the score Matmul's tiling gets baseM = 8 (not a multiple of the cube's
//        16-row fractal) before the launch; the kernels must stop on the twin's matmul-tiling
//        rule when they initialise their Matmul objects with it.
//   MODE short-score-k: the score Matmul's tiling claims singleCoreK = D - 1, so the first S
//        product (K = D) must stop on the twin's matmul-shape rule: the products are made by
//        that Matmul object, not by the vector unit.
//   IN_DIR holds grad_out.bin, q.bin, out.bin (T*HQ*D), k.bin, v.bin (T*HKV*D) in f32, bf16 or f16,
//   lse.bin (HQ*T f32) and cu_seqlens.bin (B+1 int32). MAX_BLOCKS / MAX_TILE cap the tiling
//   (0 = chip limit / UB budget). OUT gets grad_q [T, HQ, D], grad_k and grad_v [T, HKV, D] in
//   the input dtype, then the workspace's delta [HQ, T] f32.
//   stdout: "TILING tile=.. dqBlocks=.. dkvBlocks=.. dqItems=.. dkvItems=.. dqUb=.. dkvUb=..
//   budget=.. workspace=.." (exit 0), "VIOLATION rule=.." (exit 3), "TILING-ERROR .." (exit 4),
//   "WORKSPACE-OVERRUN" (exit 5: a kernel wrote past the workspace the host sized).
// usage: packed_attention_bwd budgets  -> checks the chip budgets against the twin's platform.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "packed_attention_bwd.h"
#include "packed_attention_bwd_tiling_host.h"

namespace {

std::vector<uint8_t> ReadFile(const std::string& path, size_t bytes) {
  std::vector<uint8_t> data(bytes == 0 ? 1 : bytes);
  std::ifstream in(path, std::ios::binary);
  if (bytes > 0 && !in.read(reinterpret_cast<char*>(data.data()), std::streamsize(bytes))) {
    throw std::runtime_error("could not read " + std::to_string(bytes) + " bytes from " + path);
  }
  return data;
}

// The budgets the tiling takes from packed_attention_tiling.h against the twin's platform
// (UB size and cores as the host tiling API reports them).
int CheckBudgets() {
  platform_ascendc::PlatformAscendC p910(twin::Chip::Ascend910B), p310(twin::Chip::Ascend310B);
  uint64_t ub910 = 0, ub310 = 0;
  p910.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ub910);
  p310.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ub310);
  const bool same = ub910 == kPackedAttentionAscend910B.ubBytes &&
                    p910.GetCoreNumAiv() == kPackedAttentionAscend910B.coreNum &&
                    ub310 == kPackedAttentionAscend310B.ubBytes &&
                    p310.GetCoreNumAiv() == kPackedAttentionAscend310B.coreNum;
  std::cout << (same ? "BUDGETS-AGREE" : "BUDGETS-DIFFER") << std::endl;
  return same ? 0 : 1;
}

constexpr size_t kGuardBytes = 4096;  // after the workspace: must come back untouched
constexpr uint8_t kGuard = 0xa5;

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "budgets") return CheckBudgets();
  if (argc != 14) {
    std::cerr << "usage: packed_attention_bwd run|bad-cube-tiling|short-score-k f32|bf16|f16 T B "
                 "HQ HKV D SCALE 910b|310b MAX_BLOCKS MAX_TILE IN_DIR OUT\n";
    return 2;
  }
  const std::string mode = argv[1];
  const std::string dtype = argv[2];
  const std::string chipName = argv[9];
  const bool modeOk = mode == "run" || mode == "bad-cube-tiling" || mode == "short-score-k";
  if (!modeOk || (dtype != "f32" && dtype != "bf16" && dtype != "f16") ||
      (chipName != "910b" && chipName != "310b")) {
    std::cerr << "mode must be run, bad-cube-tiling or short-score-k, dtype f32, bf16 or f16, chip "
                 "910b or 310b\n";
    return 2;
  }
  const bool isF32 = dtype == "f32";
  const bool isF16 = dtype == "f16";
  PackedAttentionProblem problem{};
  problem.tokens = static_cast<uint32_t>(std::stoul(argv[3]));
  problem.docs = static_cast<uint32_t>(std::stoul(argv[4]));
  problem.qHeads = static_cast<uint32_t>(std::stoul(argv[5]));
  problem.kvHeads = static_cast<uint32_t>(std::stoul(argv[6]));
  problem.headDim = static_cast<uint32_t>(std::stoul(argv[7]));
  problem.scale = std::stof(argv[8]);
  problem.elemBytes = isF32 ? 4u : 2u;
  // bf16 and fp16 are both 2 bytes: the dtype code tells the tiling (and the launch) which.
  problem.dtype = isF32 ? kPackedAttentionFloat32
                        : isF16 ? kPackedAttentionFloat16 : kPackedAttentionBFloat16;
  const uint32_t maxBlocks = static_cast<uint32_t>(std::stoul(argv[10]));
  const uint32_t maxTile = static_cast<uint32_t>(std::stoul(argv[11]));
  const std::string inDir = argv[12];
  const bool is910 = chipName == "910b";
  const twin::Chip chip = is910 ? twin::Chip::Ascend910B : twin::Chip::Ascend310B;
  const PackedAttentionChipBudget budget =
      is910 ? kPackedAttentionAscend910B : kPackedAttentionAscend310B;
  // One chip per process: CANN's platform manager is a singleton.
  const platform_ascendc::PlatformAscendC* platform =
      platform_ascendc::PlatformAscendCManager::GetInstance(is910 ? "Ascend910B1"
                                                                  : "Ascend310B1");

  const size_t T = problem.tokens;
  const size_t qBytes = T * problem.qHeads * problem.headDim * problem.elemBytes;
  const size_t kvBytes = T * problem.kvHeads * problem.headDim * problem.elemBytes;
  const size_t lseBytes = T * problem.qHeads * sizeof(float);
  std::vector<uint8_t> dO, q, k, v, out, lse, cu;
  try {
    dO = ReadFile(inDir + "/grad_out.bin", qBytes);
    q = ReadFile(inDir + "/q.bin", qBytes);
    out = ReadFile(inDir + "/out.bin", qBytes);
    k = ReadFile(inDir + "/k.bin", kvBytes);
    v = ReadFile(inDir + "/v.bin", kvBytes);
    lse = ReadFile(inDir + "/lse.bin", lseBytes);
    cu = ReadFile(inDir + "/cu_seqlens.bin", (problem.docs + 1u) * 4u);
  } catch (const std::runtime_error& e) {
    std::cerr << e.what() << "\n";
    return 2;
  }
  problem.cuSeqlens = reinterpret_cast<const int32_t*>(cu.data());

  PackedAttentionBwdTiling tiling{};
  try {
    tiling = MakePackedAttentionBwdTiling(problem, budget, *platform, maxTile, maxBlocks);
  } catch (const std::invalid_argument& e) {
    std::cout << "TILING-ERROR " << e.what() << std::endl;
    return 4;
  }
  const uint64_t wsBytes = PackedAttentionBwdWorkspaceBytes(tiling);
  std::cout << "TILING tile=" << tiling.tile << " dqBlocks=" << tiling.dqBlockDim
            << " dkvBlocks=" << tiling.dkvBlockDim << " dqItems=" << tiling.dqItems
            << " dkvItems=" << tiling.dkvItems << " dqUb=" << tiling.dqUbBytes
            << " dkvUb=" << tiling.dkvUbBytes << " budget=" << budget.ubBytes
            << " workspace=" << wsBytes << std::endl;
  if (mode == "bad-cube-tiling") tiling.scoreMm.baseM = 8;
  if (mode == "short-score-k") tiling.scoreMm.singleCoreK = int32_t(problem.headDim) - 1;

  // Poisoned outputs and workspace (0xff bytes: NaN): whatever a kernel reads before writing it,
  // or forgets to write, shows up in the comparison. A guard zone follows the workspace.
  std::vector<uint8_t> gradQ(qBytes == 0 ? 1 : qBytes, 0xff);
  std::vector<uint8_t> gradK(kvBytes == 0 ? 1 : kvBytes, 0xff);
  std::vector<uint8_t> gradV(kvBytes == 0 ? 1 : kvBytes, 0xff);
  std::vector<uint8_t> workspace(wsBytes + kGuardBytes, 0xff);
  std::memset(workspace.data() + wsBytes, kGuard, kGuardBytes);
  try {
    // A MIX kernel built with HAVE_WORKSPACE HAVE_TILING, as cmake/ascend.cmake builds it: the
    // twin plays the generated wrapper (system workspace set, the kernel gets the user part).
    twin::LaunchOptions mix;
    mix.type = twin::KernelType::Mix;
    mix.have_workspace_and_tiling = true;
    mix.wrapper_user_workspace = true;
    // How many vector cores of each launch did work (wrote GM), of how many there were.
    auto launch = [&](auto dq, auto dkv) {
      twin::Launch(tiling.dqBlockDim, chip, mix, dq, dO.data(), q.data(), k.data(), v.data(),
                   out.data(), lse.data(), cu.data(), gradQ.data(), workspace.data(), tiling);
      const twin::LaunchActivity dqActivity = twin::LastLaunchActivity();
      twin::Launch(tiling.dkvBlockDim, chip, mix, dkv, dO.data(), q.data(), k.data(), v.data(),
                   lse.data(), cu.data(), gradK.data(), gradV.data(), workspace.data(), tiling);
      const twin::LaunchActivity dkvActivity = twin::LastLaunchActivity();
      std::cout << "ACTIVE dq=" << dqActivity.writing_vector_cores << "/"
                << dqActivity.vector_cores << " dkv=" << dkvActivity.writing_vector_cores << "/"
                << dkvActivity.vector_cores << std::endl;
    };
    if (isF32) {
      launch(pangu_fastkd_ascend::packed_attention_bwd_dq<float>,
             pangu_fastkd_ascend::packed_attention_bwd_dkv<float>);
    } else if (isF16) {
      launch(pangu_fastkd_ascend::packed_attention_bwd_dq<half>,
             pangu_fastkd_ascend::packed_attention_bwd_dkv<half>);
    } else {
      launch(pangu_fastkd_ascend::packed_attention_bwd_dq<bfloat16_t>,
             pangu_fastkd_ascend::packed_attention_bwd_dkv<bfloat16_t>);
    }
  } catch (const twin::HardwareRuleViolation& e) {
    std::cout << "VIOLATION rule=" << e.rule() << " what=" << e.what() << std::endl;
    return 3;
  }
  for (size_t i = 0; i < kGuardBytes; ++i) {
    if (workspace[wsBytes + i] != kGuard) {
      std::cout << "WORKSPACE-OVERRUN at byte " << wsBytes + i << std::endl;
      return 5;
    }
  }
  std::ofstream file(argv[13], std::ios::binary);
  file.write(reinterpret_cast<const char*>(gradQ.data()), std::streamsize(qBytes));
  file.write(reinterpret_cast<const char*>(gradK.data()), std::streamsize(kvBytes));
  file.write(reinterpret_cast<const char*>(gradV.data()), std::streamsize(kvBytes));
  // delta sits in the user part, after the system workspace.
  file.write(reinterpret_cast<const char*>(workspace.data() + tiling.sysWorkspaceBytes +
                                           tiling.deltaOffset),
             std::streamsize(lseBytes));
  return file ? 0 : 2;
}
