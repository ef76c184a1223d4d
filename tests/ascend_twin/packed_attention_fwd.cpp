// Test driver of the packed causal attention forward (csrc/ascend/packed_attention_fwd.h) on the
// CPU twin: reads the inputs tests/test_ascend_packed_attention.py wrote, chooses the tiling with
// MakePackedAttentionTiling for the chip, launches the kernel and writes out and lse.
//
// usage: packed_attention_fwd f32|bf16 T B HQ HKV D SCALE 910b|310b MAX_BLOCKS MAX_TILE IN_DIR OUT
//   IN_DIR holds q.bin (T*HQ*D), k.bin and v.bin (T*HKV*D) in f32 or bf16, and cu_seqlens.bin
//   (B+1 int32). MAX_BLOCKS / MAX_TILE cap the tiling (0 = chip limit / UB budget).
//   OUT gets out [T, HQ, D] in the input dtype, then lse [HQ, T] f32.
//   stdout: "TILING tile=.. blockDim=.. items=.. ubBytes=.. budget=.." (exit 0),
//   "VIOLATION rule=.." (exit 3), "TILING-ERROR .." (exit 4).
// usage: packed_attention_fwd budgets  -> checks the tiling's chip budgets against the twin's.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "packed_attention_fwd.h"

namespace {

std::vector<uint8_t> ReadFile(const std::string& path, size_t bytes) {
  std::vector<uint8_t> data(bytes == 0 ? 1 : bytes);
  std::ifstream in(path, std::ios::binary);
  if (bytes > 0 && !in.read(reinterpret_cast<char*>(data.data()), std::streamsize(bytes))) {
    throw std::runtime_error("could not read " + std::to_string(bytes) + " bytes from " + path);
  }
  return data;
}

int CheckBudgets() {
  const twin::ChipInfo b910 = twin::GetChipInfo(twin::Chip::Ascend910B);
  const twin::ChipInfo b310 = twin::GetChipInfo(twin::Chip::Ascend310B);
  const bool same = b910.ub_bytes == kPackedAttentionAscend910B.ubBytes &&
                    b910.core_num == kPackedAttentionAscend910B.coreNum &&
                    b310.ub_bytes == kPackedAttentionAscend310B.ubBytes &&
                    b310.core_num == kPackedAttentionAscend310B.coreNum;
  std::cout << (same ? "BUDGETS-AGREE" : "BUDGETS-DIFFER") << std::endl;
  return same ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "budgets") return CheckBudgets();
  if (argc != 13) {
    std::cerr << "usage: packed_attention_fwd f32|bf16 T B HQ HKV D SCALE 910b|310b MAX_BLOCKS "
                 "MAX_TILE IN_DIR OUT\n";
    return 2;
  }
  const std::string dtype = argv[1];
  const std::string chipName = argv[8];
  if ((dtype != "f32" && dtype != "bf16") || (chipName != "910b" && chipName != "310b")) {
    std::cerr << "dtype must be f32 or bf16 and chip 910b or 310b\n";
    return 2;
  }
  const bool isF32 = dtype == "f32";
  PackedAttentionProblem problem{};
  problem.tokens = static_cast<uint32_t>(std::stoul(argv[2]));
  problem.docs = static_cast<uint32_t>(std::stoul(argv[3]));
  problem.qHeads = static_cast<uint32_t>(std::stoul(argv[4]));
  problem.kvHeads = static_cast<uint32_t>(std::stoul(argv[5]));
  problem.headDim = static_cast<uint32_t>(std::stoul(argv[6]));
  problem.scale = std::stof(argv[7]);
  problem.elemBytes = isF32 ? 4u : 2u;
  const uint32_t maxBlocks = static_cast<uint32_t>(std::stoul(argv[9]));
  const uint32_t maxTile = static_cast<uint32_t>(std::stoul(argv[10]));
  const std::string inDir = argv[11];
  const bool is910 = chipName == "910b";
  const twin::Chip chip = is910 ? twin::Chip::Ascend910B : twin::Chip::Ascend310B;
  const PackedAttentionChipBudget budget =
      is910 ? kPackedAttentionAscend910B : kPackedAttentionAscend310B;

  const size_t T = problem.tokens;
  const size_t qBytes = T * problem.qHeads * problem.headDim * problem.elemBytes;
  const size_t kvBytes = T * problem.kvHeads * problem.headDim * problem.elemBytes;
  std::vector<uint8_t> q, k, v, cu;
  try {
    q = ReadFile(inDir + "/q.bin", qBytes);
    k = ReadFile(inDir + "/k.bin", kvBytes);
    v = ReadFile(inDir + "/v.bin", kvBytes);
    cu = ReadFile(inDir + "/cu_seqlens.bin", (problem.docs + 1u) * 4u);
  } catch (const std::runtime_error& e) {
    std::cerr << e.what() << "\n";
    return 2;
  }
  problem.cuSeqlens = reinterpret_cast<const int32_t*>(cu.data());

  PackedAttentionTiling tiling{};
  try {
    tiling = MakePackedAttentionTiling(problem, budget, maxTile, maxBlocks);
  } catch (const std::invalid_argument& e) {
    std::cout << "TILING-ERROR " << e.what() << std::endl;
    return 4;
  }
  std::cout << "TILING tile=" << tiling.tile << " blockDim=" << tiling.blockDim
            << " items=" << tiling.workItems << " ubBytes=" << tiling.ubBytes
            << " budget=" << budget.ubBytes << std::endl;

  // Poisoned outputs: every element the kernel forgets to write shows up in the comparison.
  std::vector<uint8_t> out(qBytes == 0 ? 1 : qBytes, 0xff);
  std::vector<float> lse(T * problem.qHeads + 1, -12345.0f);
  try {
    auto launch = [&](auto kernel) {
      twin::Launch(tiling.blockDim, chip, kernel, q.data(), k.data(), v.data(), cu.data(),
                   out.data(), reinterpret_cast<GM_ADDR>(lse.data()), tiling);
    };
    if (isF32) {
      launch(pangu_fastkd_ascend::packed_attention_fwd<float>);
    } else {
      launch(pangu_fastkd_ascend::packed_attention_fwd<bfloat16_t>);
    }
  } catch (const twin::HardwareRuleViolation& e) {
    std::cout << "VIOLATION rule=" << e.rule() << " what=" << e.what() << std::endl;
    return 3;
  }
  std::ofstream file(argv[12], std::ios::binary);
  file.write(reinterpret_cast<const char*>(out.data()), std::streamsize(qBytes));
  file.write(reinterpret_cast<const char*>(lse.data()),
             std::streamsize(T * problem.qHeads * sizeof(float)));
  return file ? 0 : 2;
}
