// DataCopyPad for every element type the kernels take, on every chip they target.
//
// The 310B's (dav_m300) copy intrinsics have no bfloat16 overloads: CANN 8.1's
// impl/dav_m300/kernel_operator_data_copy_impl.h forwards DataCopyPad<T> to
// copy_gm_to_ubuf_align / copy_ubuf_to_gm_align with T*, and those exist for the 1-, 2- and
// 4-byte integer types, half and float only, so DataCopyPad on bfloat16_t tensors does not
// compile for that chip. A copy moves bits, so bf16 rows are moved as half: the same bytes land in
// the same places on every chip, and one code path serves both (the 910B has a bf16 overload, but
// nothing is gained by using it).
#pragma once

#include <type_traits>

#include "kernel_operator.h"

namespace pangu_fastkd_ascend {

// The element type a copy of T's bits goes through.
template <class T>
struct CopyBitsOf {
  using type = T;
};
template <>
struct CopyBitsOf<bfloat16_t> {
  using type = half;
};

// GM -> UB, as DataCopyPad(dst, src, params, pad) (no padding is ever requested by the kernels:
// pad.isPad must be false, because a bf16 padding value has no half twin with the same bits).
template <class T>
__aicore__ inline void DataCopyPadBits(const AscendC::LocalTensor<T>& dst,
                                       const AscendC::GlobalTensor<T>& src,
                                       const AscendC::DataCopyExtParams& params) {
  using B = typename CopyBitsOf<T>::type;
  if constexpr (std::is_same_v<B, T>) {
    AscendC::DataCopyPad(dst, src, params, AscendC::DataCopyPadExtParams<T>{false, 0, 0, T(0.0f)});
  } else {
    AscendC::GlobalTensor<B> bits;
    bits.SetGlobalBuffer(reinterpret_cast<__gm__ B*>(src.GetPhyAddr(0)), src.GetSize());
    AscendC::DataCopyPad(dst.template ReinterpretCast<B>(), bits, params,
                         AscendC::DataCopyPadExtParams<B>{false, 0, 0, B(0.0f)});
  }
}

// UB -> GM, as DataCopyPad(dst, src, params).
template <class T>
__aicore__ inline void DataCopyPadBits(const AscendC::GlobalTensor<T>& dst,
                                       const AscendC::LocalTensor<T>& src,
                                       const AscendC::DataCopyExtParams& params) {
  using B = typename CopyBitsOf<T>::type;
  if constexpr (std::is_same_v<B, T>) {
    AscendC::DataCopyPad(dst, src, params);
  } else {
    AscendC::GlobalTensor<B> bits;
    bits.SetGlobalBuffer(reinterpret_cast<__gm__ B*>(dst.GetPhyAddr(0)), dst.GetSize());
    AscendC::DataCopyPad(bits, src.template ReinterpretCast<B>(), params);
  }
}

}  // namespace pangu_fastkd_ascend
