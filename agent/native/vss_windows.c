/* The COM half of the agent's VSS provider: IVssBackupComponents through its C interface,
 * one flat function per step of agent/src/vss.rs's ShadowApi, so that Rust never lays out a
 * COM vtable by hand. Built with mingw for x86_64-pc-windows-gnu by agent/build.rs.
 *
 * Every function returns an HRESULT (S_OK or the failing call's). Asynchronous steps are
 * waited for here, and their own result (IVssAsync::QueryStatus) returned. */

#define COBJMACROS
#define CINTERFACE
/* Windows 8: CoIncrementMTAUsage. */
#define _WIN32_WINNT 0x0602
#include <stdio.h>
#include <stdlib.h>
#include <wchar.h>
#include <windows.h>
#include <vss.h>
#include <vswriter.h>
#include <vsbackup.h>

typedef struct lb_vss {
    IVssBackupComponents *backup;
    VSS_ID set;
    int has_set;
} lb_vss;

/* COM for the life of the process, once: the multithreaded apartment kept alive without a
 * thread of its own (the agent calls each step from whichever blocking thread runs it, so no
 * per-thread CoInitializeEx/CoUninitialize pair could bracket the object's life), and the
 * security VSS requestors use, so that writers in other processes can call back. */
static INIT_ONCE com_once = INIT_ONCE_STATIC_INIT;
static HRESULT com_result = S_OK;

static BOOL CALLBACK com_init(PINIT_ONCE once, PVOID param, PVOID *context)
{
    CO_MTA_USAGE_COOKIE cookie;
    HRESULT hr;
    (void)once;
    (void)param;
    (void)context;
    hr = CoIncrementMTAUsage(&cookie);
    if (SUCCEEDED(hr)) {
        hr = CoInitializeSecurity(NULL, -1, NULL, NULL, RPC_C_AUTHN_LEVEL_PKT_PRIVACY,
                                  RPC_C_IMP_LEVEL_IDENTIFY, NULL, EOAC_DYNAMIC_CLOAKING, NULL);
        /* Set already (by this process, earlier): what was set stands. */
        if (hr == RPC_E_TOO_LATE) {
            hr = S_OK;
        }
    }
    com_result = hr;
    return TRUE;
}

/* How long one asynchronous step may take before it is cancelled: a writer that never
 * answers must not hold the cut (and a stop waiting for it) for ever. VSS bounds its own
 * phases (writers' freeze 60 s, the flush-and-hold 10 s); this is beyond them. */
#define STEP_TIMEOUT_MS (180 * 1000)

static HRESULT wait_for(IVssAsync *job)
{
    HRESULT hr = IVssAsync_Wait(job, STEP_TIMEOUT_MS);
    HRESULT status = VSS_S_ASYNC_PENDING;
    HRESULT queried = IVssAsync_QueryStatus(job, &status, NULL);
    /* Still running (whatever Wait said of its timeout): cancelled, never left behind. */
    if (FAILED(queried) || status == VSS_S_ASYNC_PENDING) {
        IVssAsync_Cancel(job);
        hr = FAILED(hr) ? hr : (FAILED(queried) ? queried : HRESULT_FROM_WIN32(ERROR_TIMEOUT));
    }
    IVssAsync_Release(job);
    if (FAILED(hr)) {
        return hr;
    }
    /* VSS_S_ASYNC_FINISHED is success; VSS_S_ASYNC_CANCELLED is not. */
    return status == VSS_S_ASYNC_CANCELLED ? E_ABORT : (FAILED(status) ? status : S_OK);
}

HRESULT lb_vss_open(lb_vss **out)
{
    lb_vss *v;
    HRESULT hr;
    InitOnceExecuteOnce(&com_once, com_init, NULL, NULL);
    if (FAILED(com_result)) {
        return com_result;
    }
    v = (lb_vss *)calloc(1, sizeof *v);
    if (!v) {
        return E_OUTOFMEMORY;
    }
    hr = CreateVssBackupComponents(&v->backup);
    if (FAILED(hr)) {
        free(v);
        return hr;
    }
    *out = v;
    return S_OK;
}

/* Copy-only, writers included (no component selection), then the writers' metadata. */
HRESULT lb_vss_begin(lb_vss *v)
{
    IVssAsync *job = NULL;
    HRESULT hr = IVssBackupComponents_InitializeForBackup(v->backup, NULL);
    if (SUCCEEDED(hr)) {
        hr = IVssBackupComponents_SetContext(v->backup, VSS_CTX_BACKUP);
    }
    if (SUCCEEDED(hr)) {
        hr = IVssBackupComponents_SetBackupState(v->backup, FALSE, FALSE, VSS_BT_COPY, FALSE);
    }
    if (SUCCEEDED(hr)) {
        hr = IVssBackupComponents_GatherWriterMetadata(v->backup, &job);
    }
    if (SUCCEEDED(hr)) {
        hr = wait_for(job);
    }
    return hr;
}

HRESULT lb_vss_start_set(lb_vss *v)
{
    HRESULT hr = IVssBackupComponents_StartSnapshotSet(v->backup, &v->set);
    if (SUCCEEDED(hr)) {
        v->has_set = 1;
    }
    return hr;
}

HRESULT lb_vss_add_volume(lb_vss *v, const wchar_t *volume, GUID *id)
{
    GUID none = {0};
    return IVssBackupComponents_AddToSnapshotSet(v->backup, (VSS_PWSZ)volume, none, id);
}

HRESULT lb_vss_prepare(lb_vss *v)
{
    IVssAsync *job = NULL;
    HRESULT hr = IVssBackupComponents_PrepareForBackup(v->backup, &job);
    if (SUCCEEDED(hr)) {
        hr = wait_for(job);
    }
    return hr;
}

HRESULT lb_vss_snapshot(lb_vss *v)
{
    IVssAsync *job = NULL;
    HRESULT hr = IVssBackupComponents_DoSnapshotSet(v->backup, &job);
    if (SUCCEEDED(hr)) {
        hr = wait_for(job);
    }
    return hr;
}

/* The snapshot's device object, copied into out (cap wide characters, terminated). */
HRESULT lb_vss_device(lb_vss *v, const GUID *id, wchar_t *out, size_t cap)
{
    VSS_SNAPSHOT_PROP prop;
    HRESULT hr = IVssBackupComponents_GetSnapshotProperties(v->backup, *id, &prop);
    if (FAILED(hr)) {
        return hr;
    }
    if (!prop.m_pwszSnapshotDeviceObject || wcslen(prop.m_pwszSnapshotDeviceObject) >= cap) {
        hr = E_NOT_SUFFICIENT_BUFFER;
    } else {
        wcscpy(out, prop.m_pwszSnapshotDeviceObject);
    }
    VssFreeSnapshotProperties(&prop);
    return hr;
}

/* Writers that did not come through as "name: state N, error 0x…" lines in out (cap wide
 * characters); count is how many, whether or not their lines fit. After DoSnapshotSet a writer
 * that came through is stable or waiting for BackupComplete, with no failure code; anything
 * else (unknown, still waiting for freeze, thaw or post-snapshot, failed at any step) did not. */
HRESULT lb_vss_failed_writers(lb_vss *v, wchar_t *out, size_t cap, unsigned *count)
{
    IVssAsync *job = NULL;
    UINT n = 0, i;
    size_t used = 0;
    HRESULT hr = IVssBackupComponents_GatherWriterStatus(v->backup, &job);
    *count = 0;
    out[0] = 0;
    if (SUCCEEDED(hr)) {
        hr = wait_for(job);
    }
    if (SUCCEEDED(hr)) {
        hr = IVssBackupComponents_GetWriterStatusCount(v->backup, &n);
    }
    for (i = 0; SUCCEEDED(hr) && i < n; i++) {
        VSS_ID instance, writer;
        BSTR name = NULL;
        VSS_WRITER_STATE state;
        HRESULT failure = S_OK;
        hr = IVssBackupComponents_GetWriterStatus(v->backup, i, &instance, &writer, &name, &state,
                                                  &failure);
        if (SUCCEEDED(hr) && (FAILED(failure) || (state != VSS_WS_STABLE &&
                                                  state != VSS_WS_WAITING_FOR_BACKUP_COMPLETE))) {
            int w = _snwprintf(out + used, cap - used, L"%ls: state %d, error 0x%08lx\n",
                               name ? name : L"?", (int)state, (unsigned long)failure);
            if (w > 0 && (size_t)w < cap - used) {
                used += (size_t)w;
            }
            (*count)++;
        }
        if (name) {
            SysFreeString(name);
        }
    }
    IVssBackupComponents_FreeWriterStatus(v->backup);
    return hr;
}

HRESULT lb_vss_complete(lb_vss *v)
{
    IVssAsync *job = NULL;
    HRESULT hr = IVssBackupComponents_BackupComplete(v->backup, &job);
    if (SUCCEEDED(hr)) {
        hr = wait_for(job);
    }
    return hr;
}

HRESULT lb_vss_abort(lb_vss *v)
{
    return IVssBackupComponents_AbortBackup(v->backup);
}

HRESULT lb_vss_delete_set(lb_vss *v)
{
    LONG deleted = 0;
    VSS_ID failed;
    HRESULT hr;
    if (!v->has_set) {
        return S_OK;
    }
    hr = IVssBackupComponents_DeleteSnapshots(v->backup, v->set, VSS_OBJECT_SNAPSHOT_SET, TRUE,
                                              &deleted, &failed);
    /* Nothing made yet (the set never snapshotted) is not an error. */
    if (hr == VSS_E_OBJECT_NOT_FOUND) {
        hr = S_OK;
    }
    if (SUCCEEDED(hr)) {
        v->has_set = 0;
    }
    return hr;
}

void lb_vss_close(lb_vss *v)
{
    if (!v) {
        return;
    }
    if (v->backup) {
        IVssBackupComponents_Release(v->backup);
    }
    free(v);
}
