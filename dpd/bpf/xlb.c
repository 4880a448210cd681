/* The xlb datapath (TC, and the XDP stage): one compilation unit (bcc compiles one
 * text), one file per entry section. Every header includes what it uses. */
#include "tc_main.c"
#include "tc_slow.c"
#include "tc_slow6.c"
#include "xdp.c"
#include "mirror.c"
#include "police.c"
