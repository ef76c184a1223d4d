// Test driver of the sparse-KD / CE epilogue kernel (csrc/ascend/sparse_kd_epilogue.h) on the CPU
// twin: reads the inputs tests/test_ascend_sparse_kd.py wrote, chooses the tiling with
// MakeSparseKdTiling for the chip, launches the kernel and writes loss, lse and the gradient.
//
// usage: sparse_kd_epilogue f32|bf16 N V K KD_WEIGHT T SCALE 910b|310b MAX_BLOCKS MAX_CHUNK
//                           IN_DIR OUT
//   IN_DIR holds logits.bin (N*V f32 or bf16), labels.bin (N int32) and, when KD_WEIGHT > 0,
//   ids.bin (N*K int32), teacher_logits.bin (N*K f32), teacher_lse.bin (N f32),
//   label_logit.bin (N f32). MAX_BLOCKS / MAX_CHUNK cap the tiling (0 = chip limit / UB budget).
//   OUT gets loss [N] f32, lse [N] f32, then the gradient [N, V] in the logits dtype.
//   stdout: "TILING chunk=.. blockDim=.. ubBytes=.. budget=.." (exit 0), "VIOLATION rule=.."
//   (exit 3), "TILING-ERROR .." (exit 4).
// usage: sparse_kd_epilogue budgets  -> checks the tiling's chip budgets against the twin's.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse_kd_epilogue.h"

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
  const bool same = b910.ub_bytes == kSparseKdAscend910B.ubBytes &&
                    b910.core_num == kSparseKdAscend910B.coreNum &&
                    b310.ub_bytes == kSparseKdAscend310B.ubBytes &&
                    b310.core_num == kSparseKdAscend310B.coreNum;
  std::cout << (same ? "BUDGETS-AGREE" : "BUDGETS-DIFFER") << std::endl;
  return same ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "budgets") return CheckBudgets();
  if (argc != 13) {
    std::cerr << "usage: sparse_kd_epilogue f32|bf16 N V K KD_WEIGHT T SCALE 910b|310b "
                 "MAX_BLOCKS MAX_CHUNK IN_DIR OUT\n";
    return 2;
  }
  const std::string dtype = argv[1];
  const std::string chipName = argv[8];
  if ((dtype != "f32" && dtype != "bf16") || (chipName != "910b" && chipName != "310b")) {
    std::cerr << "dtype must be f32 or bf16 and chip 910b or 310b\n";
    return 2;
  }
  const bool isF32 = dtype == "f32";
  SparseKdProblem problem{};
  problem.rows = static_cast<uint32_t>(std::stoul(argv[2]));
  problem.vocab = static_cast<uint32_t>(std::stoul(argv[3]));
  problem.supportK = static_cast<uint32_t>(std::stoul(argv[4]));
  problem.kdWeight = std::stof(argv[5]);
  problem.temperature = std::stof(argv[6]);
  problem.scale = std::stof(argv[7]);
  problem.elemBytes = isF32 ? 4u : 2u;
  problem.ignoreIndex = -100;
  const uint32_t maxBlocks = static_cast<uint32_t>(std::stoul(argv[9]));
  const uint32_t maxChunk = static_cast<uint32_t>(std::stoul(argv[10]));
  const std::string inDir = argv[11];
  const bool is910 = chipName == "910b";
  const twin::Chip chip = is910 ? twin::Chip::Ascend910B : twin::Chip::Ascend310B;
  const SparseKdChipBudget budget = is910 ? kSparseKdAscend910B : kSparseKdAscend310B;

  SparseKdTiling tiling{};
  try {
    tiling = MakeSparseKdTiling(problem, budget, maxChunk, maxBlocks);
  } catch (const std::invalid_argument& e) {
    std::cout << "TILING-ERROR " << e.what() << std::endl;
    return 4;
  }
  std::cout << "TILING chunk=" << tiling.chunk << " blockDim=" << tiling.blockDim
            << " ubBytes=" << tiling.ubBytes << " budget=" << budget.ubBytes << std::endl;

  const size_t n = problem.rows;
  const size_t k = tiling.supportK;
  const size_t logitBytes = n * problem.vocab * problem.elemBytes;
  std::vector<uint8_t> logits, labels, ids, teacher, teacherLse, labelLogit;
  try {
    logits = ReadFile(inDir + "/logits.bin", logitBytes);
    labels = ReadFile(inDir + "/labels.bin", n * 4);
    if (tiling.kdWeight > 0.0f) {
      ids = ReadFile(inDir + "/ids.bin", n * k * 4);
      teacher = ReadFile(inDir + "/teacher_logits.bin", n * k * 4);
      teacherLse = ReadFile(inDir + "/teacher_lse.bin", n * 4);
      labelLogit = ReadFile(inDir + "/label_logit.bin", n * 4);
    }
  } catch (const std::runtime_error& e) {
    std::cerr << e.what() << "\n";
    return 2;
  }
  std::vector<float> loss(n + 1, -1.0f), lse(n + 1, -1.0f);
  try {
    auto launch = [&](auto kernel) {
      twin::Launch(tiling.blockDim, chip, kernel, logits.data(), labels.data(), ids.data(),
                   teacher.data(), teacherLse.data(), labelLogit.data(),
                   reinterpret_cast<GM_ADDR>(loss.data()), reinterpret_cast<GM_ADDR>(lse.data()),
                   tiling);
    };
    if (isF32) {
      launch(pangu_fastkd_ascend::sparse_kd_epilogue<float>);
    } else {
      launch(pangu_fastkd_ascend::sparse_kd_epilogue<bfloat16_t>);
    }
  } catch (const twin::HardwareRuleViolation& e) {
    std::cout << "VIOLATION rule=" << e.rule() << " what=" << e.what() << std::endl;
    return 3;
  }
  std::ofstream out(argv[12], std::ios::binary);
  out.write(reinterpret_cast<const char*>(loss.data()), std::streamsize(n * sizeof(float)));
  out.write(reinterpret_cast<const char*>(lse.data()), std::streamsize(n * sizeof(float)));
  out.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logitBytes));
  return out ? 0 : 2;
}
