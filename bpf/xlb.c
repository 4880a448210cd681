/* The xlb TC datapath: one compilation unit, one file per entry section. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "maps.h"
#include "parse.h"
#include "stats.h"
#include "nat.h"
#include "fwd.h"
#include "ct.h"
#include "lb.h"

#include "tc_main.c"
#include "tc_slow.c"
