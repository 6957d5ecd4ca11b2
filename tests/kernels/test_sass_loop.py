"""scripts/sass_loop.py: the loop it reports from a cuobjdump -sass listing (text only, no GPU)."""

from ..conftest import load_script

# two functions in cuobjdump's layout: the first has an inner loop without MMAs inside an outer
# loop with two; a forward branch and predicated instructions around them
SASS = """
        code for sm_90a
                Function : _Z3onev
        .headerflags    @"EF_CUDA_SM90"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/              @P0 BRA 0x70 ;                              /* 0x0000000000000947 */
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;  /* 0x0 */
        /*0030*/                   IADD3 R5, R5, 0x1, RZ ;                /* 0x0 */
        /*0040*/              @!P1 BRA 0x30 ;                             /* 0x0 */
        /*0050*/                   HMMA.16816.F32 R8, R12, R16, R8 ;      /* 0x0 */
        /*0060*/                   HGMMA.64x32x16.F32 R24, R40, gdesc[UR8], R24 ;  /* 0x0 */
        /*0070*/              @!P0 LOP3.LUT R6, R7, 0xf000f, R9, 0xea, !PT ;  /* 0x0 */
        /*0080*/              @!P2 BRA 0x20 ;                             /* 0x0 */
        /*0090*/                   EXIT ;                                 /* 0x0 */
                ..........
                Function : _Z3twov
        /*0000*/                   EXIT ;                                 /* 0x0 */
"""


def test_the_loop_with_the_most_mmas_and_its_opcodes():
    sass = load_script("sass_loop")
    funcs = sass.functions(SASS)
    assert list(funcs) == ["_Z3onev", "_Z3twov"]
    one = funcs["_Z3onev"]
    assert [a for a, _ in one] == list(range(0, 0xA0, 0x10))
    # the outer loop (0x20-0x80) holds both MMAs; the inner one (0x30-0x40) none; 0x10 goes forward
    assert sass.main_loop(one) == (2, 8, 2)
    assert sass.opcode("@!P0 LOP3.LUT R6, R7, 0xf000f, R9, 0xea, !PT") == "LOP3"
    report = sass.report("_Z3onev", one, listing=True)
    assert "loop 0x20-0x80: 7 instructions, 2 MMAs" in report
    assert "BRA:2" in report and "LDGSTS:1" in report and "HGMMA:1" in report
    assert "0x0070  @!P0 LOP3.LUT" in report
    assert sass.report("_Z3twov", funcs["_Z3twov"]) == "_Z3twov: no loop"
