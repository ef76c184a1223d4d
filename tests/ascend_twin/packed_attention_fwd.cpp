// Test driver of the packed causal attention forward (csrc/ascend/packed_attention_fwd.h) on the
// CPU twin: reads the inputs tests/test_ascend_packed_attention.py wrote, chooses the tiling with
// MakePackedAttentionTiling for the chip (cube tilings from the twin's CANN host tiling API),
// allocates the GM workspace PackedAttentionWorkspaceBytes asks for, launches the kernel and
// writes out and lse.
//
// usage: packed_attention_fwd f32|bf16|f16[:CODE] T B HQ HKV D SCALE 910b|310b MAX_BLOCKS MAX_TILE
//                             IN_DIR OUT [WS_OUT]
//   :CODE writes a raw PackedAttentionProblem::dtype over the one the type name implies (the
//   element size stays the type's), to test the tiling's checks.
//   IN_DIR holds q.bin (T*HQ*D), k.bin and v.bin (T*HKV*D) in f32, bf16 or f16, and cu_seqlens.bin
//   (B+1 int32). MAX_BLOCKS / MAX_TILE cap the tiling (0 = chip limit / UB budget).
//   OUT gets out [T, HQ, D] in the input dtype, then lse [HQ, T] f32. WS_OUT, when given, gets
//   block 0's scratch area of the workspace after the launch (what the cube and vector units
//   left there).
//   stdout: "TILING tile=.. blockDim=.. items=.. ubBytes=.. budget=.." then "WORKSPACE
//   total=.. sys=.. block=.. q=.. s=.. p=.. o=.." and "CUBE qk=MxNxK/baseMxbaseNxbaseK pv=.."
//   (exit 0), "VIOLATION rule=.." (exit 3), "TILING-ERROR .." (exit 4).
// usage: packed_attention_fwd budgets  -> checks the tiling's chip budgets against the twin's.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "packed_attention_fwd.h"
#include "packed_attention_tiling_host.h"

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

// For each part named: its core counts as the platform reports them, and the blocks the forward
// tiling launches for 64 one-tile documents x 8 kv heads = 512 work items (capped at the cube
// cores: a MIX block is one cube core and its vector cores).
int PrintParts(int argc, char** argv) {
  std::vector<int32_t> cu(65);
  for (int32_t b = 0; b <= 64; ++b) cu[b] = 16 * b;
  PackedAttentionProblem problem{};
  problem.tokens = 16 * 64;
  problem.docs = 64;
  problem.qHeads = 8;
  problem.kvHeads = 8;
  problem.headDim = 64;
  problem.scale = 0.125f;
  problem.dtype = kPackedAttentionFloat32;
  problem.elemBytes = 4;
  problem.cuSeqlens = cu.data();
  for (int i = 2; i < argc; ++i) {
    const platform_ascendc::PlatformAscendC platform{std::string_view(argv[i])};
    const bool is910 = twin::SocChip(argv[i]) == twin::Chip::Ascend910B;
    const PackedAttentionTiling t = MakePackedAttentionTiling(
        problem, is910 ? kPackedAttentionAscend910B : kPackedAttentionAscend310B, platform);
    std::cout << "PART " << argv[i] << " aic=" << platform.GetCoreNumAic()
              << " aiv=" << platform.GetCoreNumAiv() << " blocks=" << t.blockDim << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "budgets") return CheckBudgets();
  if (argc >= 3 && std::string(argv[1]) == "parts") return PrintParts(argc, argv);
  if (argc != 13 && argc != 14) {
    std::cerr << "usage: packed_attention_fwd f32|bf16|f16 T B HQ HKV D SCALE 910b|310b "
                 "MAX_BLOCKS MAX_TILE IN_DIR OUT [WS_OUT]\n";
    return 2;
  }
  std::string dtype = argv[1];
  std::string dtypeCode;
  if (const size_t colon = dtype.find(':'); colon != std::string::npos) {
    dtypeCode = dtype.substr(colon + 1);
    dtype = dtype.substr(0, colon);
  }
  const std::string chipName = argv[8];
  if ((dtype != "f32" && dtype != "bf16" && dtype != "f16") ||
      (chipName != "910b" && chipName != "310b")) {
    std::cerr << "dtype must be f32, bf16 or f16 and chip 910b or 310b\n";
    return 2;
  }
  PackedAttentionProblem problem{};
  problem.tokens = static_cast<uint32_t>(std::stoul(argv[2]));
  problem.docs = static_cast<uint32_t>(std::stoul(argv[3]));
  problem.qHeads = static_cast<uint32_t>(std::stoul(argv[4]));
  problem.kvHeads = static_cast<uint32_t>(std::stoul(argv[5]));
  problem.headDim = static_cast<uint32_t>(std::stoul(argv[6]));
  problem.scale = std::stof(argv[7]);
  problem.dtype = dtype == "f32" ? kPackedAttentionFloat32
                                 : (dtype == "bf16" ? kPackedAttentionBFloat16
                                                    : kPackedAttentionFloat16);
  problem.elemBytes = PackedAttentionDtypeBytes(problem.dtype);
  if (!dtypeCode.empty()) problem.dtype = static_cast<uint32_t>(std::stoul(dtypeCode));
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

  // A singleton as in CANN: one chip per process, which is all the driver needs.
  const platform_ascendc::PlatformAscendC& platform =
      *platform_ascendc::PlatformAscendCManager::GetInstance(is910 ? "Ascend910B1"
                                                                   : "Ascend310B1");
  PackedAttentionTiling tiling{};
  try {
    tiling = MakePackedAttentionTiling(problem, budget, platform, maxTile, maxBlocks);
  } catch (const std::invalid_argument& e) {
    std::cout << "TILING-ERROR " << e.what() << std::endl;
    return 4;
  }
  std::cout << "TILING tile=" << tiling.tile << " blockDim=" << tiling.blockDim
            << " items=" << tiling.workItems << " ubBytes=" << tiling.ubBytes
            << " budget=" << budget.ubBytes << std::endl;
  const PackedAttentionWorkspaceLayout layout =
      PackedAttentionBlockWorkspace(tiling.group, tiling.tile, problem.headDim, problem.elemBytes);
  const uint64_t wsBytes = PackedAttentionWorkspaceBytes(tiling);
  std::cout << "WORKSPACE total=" << wsBytes << " sys=" << tiling.sysWorkspaceBytes
            << " block=" << tiling.blockWorkspaceBytes << " slots=" << tiling.blockSlots
            << " q=" << layout.q << " s=" << layout.s
            << " p=" << layout.p << " o=" << layout.o << std::endl;
  auto cube = [](const TCubeTiling& c) {
    return std::to_string(c.singleCoreM) + "x" + std::to_string(c.singleCoreN) + "x" +
           std::to_string(c.singleCoreK) + "/" + std::to_string(c.baseM) + "x" +
           std::to_string(c.baseN) + "x" + std::to_string(c.baseK);
  };
  std::cout << "CUBE qk=" << cube(tiling.qk) << " pv=" << cube(tiling.pv) << std::endl;

  // Poisoned outputs: every element the kernel forgets to write shows up in the comparison.
  std::vector<uint8_t> out(qBytes == 0 ? 1 : qBytes, 0xff);
  std::vector<float> lse(T * problem.qHeads + 1, -12345.0f);
  // Poisoned workspace (NaN for floats): scratch the kernel reads before writing shows up.
  std::vector<uint8_t> workspace(wsBytes, 0xff);
  try {
    // A MIX kernel built with HAVE_WORKSPACE HAVE_TILING, as cmake/ascend.cmake builds it: the
    // twin plays the generated wrapper (system workspace set, the kernel gets the user part).
    twin::LaunchOptions mix;
    mix.type = twin::KernelType::Mix;
    mix.have_workspace_and_tiling = true;
    mix.wrapper_user_workspace = true;
    auto launch = [&](auto kernel) {
      twin::Launch(tiling.blockDim, chip, mix, kernel, q.data(), k.data(), v.data(), cu.data(),
                   out.data(), reinterpret_cast<GM_ADDR>(lse.data()), workspace.data(), tiling);
    };
    // The tiling names the input type; bf16 and fp16 have the same size, so only it can tell.
    if (tiling.dtype == kPackedAttentionFloat32) {
      launch(pangu_fastkd_ascend::packed_attention_fwd<float>);
    } else if (tiling.dtype == kPackedAttentionBFloat16) {
      launch(pangu_fastkd_ascend::packed_attention_fwd<bfloat16_t>);
    } else {
      launch(pangu_fastkd_ascend::packed_attention_fwd<half>);
    }
  } catch (const twin::HardwareRuleViolation& e) {
    std::cout << "VIOLATION rule=" << e.rule() << " what=" << e.what() << std::endl;
    return 3;
  }
  if (argc == 14) {
    std::ofstream ws(argv[13], std::ios::binary);
    // The last vector core's scratch area, in the user part after the system workspace.
    const uint64_t last = uint64_t(tiling.blockSlots - 1u) * tiling.blockWorkspaceBytes;
    ws.write(reinterpret_cast<const char*>(workspace.data() + tiling.sysWorkspaceBytes + last),
             std::streamsize(tiling.blockWorkspaceBytes));
    if (!ws) return 2;
  }
  std::ofstream file(argv[12], std::ios::binary);
  file.write(reinterpret_cast<const char*>(out.data()), std::streamsize(qBytes));
  file.write(reinterpret_cast<const char*>(lse.data()),
             std::streamsize(T * problem.qHeads * sizeof(float)));
  return file ? 0 : 2;
}
