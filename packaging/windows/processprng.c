/* A stand-in for Windows' bcryptprimitives.dll, for running the Windows test build under wine
 * (scripts/test-windows). Rust's std gets its randomness from ProcessPrng there, which wine 8.0
 * does not provide, so no Rust executable would start; this forwards to BCryptGenRandom, which
 * wine has. Built with mingw by the script; never shipped. */
#include <windows.h>
#include <bcrypt.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG)))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
