// Test driver of the sparse-KD / CE epilogue kernel (csrc/ascend/sparse_kd_epilogue.h) on the CPU
// twin: for each case directory tests/test_ascend_sparse_kd.py wrote, reads the problem and its
// inputs, chooses the tiling with MakeSparseKdTiling for the chip, launches the kernel and writes
// loss, statistics and the gradient. Many cases run in one process, so the test pays the process
// start-up once.
//
// usage: sparse_kd_epilogue CASE_DIR...
//   CASE_DIR/case.txt holds "key value" lines: dtype (f32|bf16|f16), rows, vocab, k, target
//   (topk|sampled), kd_weight, temperature, cache_temperature, divergence (0|1|2), missing_mass
//   (0|1), include_label (0|1), beta, use_softcap (0|1), softcap, z_loss, scale, chip
//   (910b|310b), max_blocks, max_chunk (0 = chip limit / UB budget), optionally dtype_code (a raw
//   SparseKdProblem::dtype written over the one dtype implies, to test its checks), and ub_slack:
//   when present, each block's UB budget is set to the tiling's ubBytes + ub_slack (0 must run,
//   -32 must trip ub-budget: together they show SparseKdUbBytes equals the InitBuffer sum).
//   Inputs: logits.bin (N*V f32, bf16 or f16), labels.bin (N int32) and, when kd_weight > 0,
//   ids.bin (N*K int32), teacher_values.bin (N*K f32: teacher logits or sample weights), and for
//   top-K teacher_lse.bin (N f32) and label_logit.bin (N f32).
//   Outputs: result.txt with one line, "TILING chunk=.. blockDim=.. ubBytes=.. budget=..",
//   "VIOLATION rule=.. what=.." or "TILING-ERROR ..", and, after TILING, out.bin: loss [N] f32,
//   stats [N, 6] f32, then the gradient [N, V] in the logits dtype.
//   Exit 0 when every case was run (whatever its result), 2 on a bad case file or input.
// usage: sparse_kd_epilogue budgets  -> checks the tiling's chip budgets against the twin's.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse_kd_epilogue.h"
#include "sparse_kd_tiling_host.h"

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

class CaseFile {
 public:
  explicit CaseFile(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    std::string key, value;
    while (in >> key >> value) values_[key] = value;
  }
  const std::string& Str(const std::string& key) const {
    auto it = values_.find(key);
    if (it == values_.end()) throw std::runtime_error("case.txt has no " + key);
    return it->second;
  }
  bool Has(const std::string& key) const { return values_.count(key) != 0; }
  uint32_t U32(const std::string& key) const { return uint32_t(std::stoul(Str(key))); }
  float F32(const std::string& key) const { return std::stof(Str(key)); }

 private:
  std::map<std::string, std::string> values_;
};

// Runs one case directory; returns its result line.
std::string RunCase(const std::string& dir) {
  const CaseFile cf(dir + "/case.txt");
  const std::string dtype = cf.Str("dtype"), chipName = cf.Str("chip"), target = cf.Str("target");
  if ((dtype != "f32" && dtype != "bf16" && dtype != "f16") ||
      (chipName != "910b" && chipName != "310b") || (target != "topk" && target != "sampled")) {
    throw std::runtime_error("dtype must be f32|bf16|f16, chip 910b|310b, target topk|sampled");
  }
  SparseKdProblem problem{};
  problem.rows = cf.U32("rows");
  problem.vocab = cf.U32("vocab");
  problem.supportK = cf.U32("k");
  problem.dtype = dtype == "f32" ? kSparseKdFloat32
                                 : (dtype == "bf16" ? kSparseKdBFloat16 : kSparseKdFloat16);
  problem.elemBytes = SparseKdDtypeBytes(problem.dtype);
  if (cf.Has("dtype_code")) problem.dtype = cf.U32("dtype_code");
  problem.kdWeight = cf.F32("kd_weight");
  problem.temperature = cf.F32("temperature");
  problem.cacheTemperature = cf.F32("cache_temperature");
  problem.scale = cf.F32("scale");
  problem.ignoreIndex = -100;
  problem.targetKind = target == "topk" ? kSparseKdTopK : kSparseKdSampled;
  problem.divergence = cf.U32("divergence");
  problem.missingMass = cf.U32("missing_mass");
  problem.includeLabel = cf.U32("include_label") != 0u;
  problem.beta = cf.F32("beta");
  problem.useSoftcap = cf.U32("use_softcap") != 0u;
  problem.softcap = cf.F32("softcap");
  problem.zLoss = cf.F32("z_loss");
  const bool is910 = chipName == "910b";
  const twin::Chip chip = is910 ? twin::Chip::Ascend910B : twin::Chip::Ascend310B;
  const SparseKdChipBudget budget = is910 ? kSparseKdAscend910B : kSparseKdAscend310B;

  SparseKdTiling tiling{};
  try {
    tiling = MakeSparseKdTiling(problem, budget, cf.U32("max_chunk"), cf.U32("max_blocks"));
  } catch (const std::invalid_argument& e) {
    return std::string("TILING-ERROR ") + e.what();
  }

  const size_t n = problem.rows;
  const size_t k = tiling.supportK;
  const size_t logitBytes = n * problem.vocab * problem.elemBytes;
  std::vector<uint8_t> logits = ReadFile(dir + "/logits.bin", logitBytes);
  std::vector<uint8_t> labels = ReadFile(dir + "/labels.bin", n * 4);
  std::vector<uint8_t> ids(1), teacher(1), teacherLse(1), labelLogit(1);
  if (tiling.kdWeight > 0.0f) {
    ids = ReadFile(dir + "/ids.bin", n * k * 4);
    teacher = ReadFile(dir + "/teacher_values.bin", n * k * 4);
    if (tiling.targetKind == kSparseKdTopK) {
      teacherLse = ReadFile(dir + "/teacher_lse.bin", n * 4);
      labelLogit = ReadFile(dir + "/label_logit.bin", n * 4);
    }
  }
  // -1 everywhere: a row the kernel forgets to write is visible.
  std::vector<float> loss(n + 1, -1.0f), stats(n * pangu_fastkd_ascend::kStatCount + 1, -1.0f);
  const bool exactUb = cf.Has("ub_slack");
  const int64_t ubLimit = exactUb ? int64_t(tiling.ubBytes) + std::stol(cf.Str("ub_slack")) : 0;
  try {
    auto launch = [&](auto kernel) {
      // Test-only use of the twin's block context: the kernel's TPipe takes its UB budget from
      // it when constructed, so this limits the kernel to exactly what the tiling announced.
      auto limited = [&](auto... args) {
        if (exactUb) twin::detail::Block("driver").chip.ub_bytes = uint32_t(ubLimit);
        kernel(args...);
      };
      const twin::LaunchOptions aivOnly{twin::KernelType::AivOnly};
      twin::Launch(tiling.blockDim, chip, aivOnly, limited, logits.data(), labels.data(),
                   ids.data(),
                   teacher.data(), teacherLse.data(), labelLogit.data(),
                   reinterpret_cast<GM_ADDR>(loss.data()), reinterpret_cast<GM_ADDR>(stats.data()),
                   tiling);
    };
    // The tiling names the logits' type; bf16 and fp16 have the same size, so only it can tell.
    if (tiling.dtype == kSparseKdFloat32) {
      launch(pangu_fastkd_ascend::sparse_kd_epilogue<float>);
    } else if (tiling.dtype == kSparseKdBFloat16) {
      launch(pangu_fastkd_ascend::sparse_kd_epilogue<bfloat16_t>);
    } else {
      launch(pangu_fastkd_ascend::sparse_kd_epilogue<half>);
    }
  } catch (const twin::HardwareRuleViolation& e) {
    return std::string("VIOLATION rule=") + e.rule() + " what=" + e.what();
  }
  std::ofstream out(dir + "/out.bin", std::ios::binary);
  out.write(reinterpret_cast<const char*>(loss.data()), std::streamsize(n * sizeof(float)));
  out.write(reinterpret_cast<const char*>(stats.data()),
            std::streamsize(n * pangu_fastkd_ascend::kStatCount * sizeof(float)));
  out.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logitBytes));
  if (!out) throw std::runtime_error("could not write " + dir + "/out.bin");
  std::ostringstream line;
  line << "TILING chunk=" << tiling.chunk << " blockDim=" << tiling.blockDim
       << " ubBytes=" << tiling.ubBytes << " budget=" << budget.ubBytes;
  return line.str();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "budgets") return CheckBudgets();
  if (argc < 2) {
    std::cerr << "usage: sparse_kd_epilogue CASE_DIR... | budgets\n";
    return 2;
  }
  for (int i = 1; i < argc; ++i) {
    const std::string dir = argv[i];
    try {
      const std::string result = RunCase(dir);
      std::ofstream(dir + "/result.txt") << result << "\n";
    } catch (const std::exception& e) {
      std::cerr << dir << ": " << e.what() << "\n";
      return 2;
    }
  }
  return 0;
}
