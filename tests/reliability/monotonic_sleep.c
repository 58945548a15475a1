/* Preloaded before libfaketime for the worker whose wall clock the reliability cases step.
 *
 * Debian's libfaketime (0.9.10) with FAKETIME_DONT_FAKE_MONOTONIC=1 fails every clock_nanosleep on
 * CLOCK_MONOTONIC with EINVAL, and Python's time.sleep is exactly that call: every sleep of the
 * worker process (redis-py's reconnect pause, for one) would raise OSError, which a real clock step
 * never causes. The monotonic clock is not faked anyway, so those sleeps go straight to the kernel;
 * sleeps on any other clock still pass through libfaketime. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock, int flags, const struct timespec *request, struct timespec *remain) {
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);

    if (clock == CLOCK_MONOTONIC) {
        return syscall(SYS_clock_nanosleep, clock, flags, request, remain) == 0 ? 0 : errno;
    }
    if (next == NULL) {
        next = dlsym(RTLD_NEXT, "clock_nanosleep");
    }
    return next(clock, flags, request, remain);
}
