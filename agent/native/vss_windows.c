/* The COM half of the agent's VSS provider: IVssBackupComponents through its C interface,
 * one flat function per step of agent/src/vss.rs's ShadowApi, so that Rust never lays out a
 * COM vtable by hand. Built with mingw for x86_64-pc-windows-gnu by agent/build.rs.
 *
 * Every function returns an HRESULT (S_OK or the failing call's). Asynchronous steps are
 * waited for here, and their own result (IVssAsync::QueryStatus) returned. */

#define COBJMACROS
#define CINTERFACE
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
    int com;
} lb_vss;

static HRESULT wait_for(IVssAsync *job)
{
    HRESULT hr = IVssAsync_Wait(job, INFINITE);
    HRESULT status = S_OK;
    if (SUCCEEDED(hr)) {
        hr = IVssAsync_QueryStatus(job, &status, NULL);
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
    lb_vss *v = (lb_vss *)calloc(1, sizeof *v);
    HRESULT hr;
    if (!v) {
        return E_OUTOFMEMORY;
    }
    hr = CoInitializeEx(NULL, COINIT_MULTITHREADED);
    if (FAILED(hr) && hr != RPC_E_CHANGED_MODE) {
        free(v);
        return hr;
    }
    v->com = SUCCEEDED(hr);
    hr = CreateVssBackupComponents(&v->backup);
    if (FAILED(hr)) {
        if (v->com) {
            CoUninitialize();
        }
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

HRESULT lb_vss_snapshot(lb_vss *v)
{
    IVssAsync *job = NULL;
    HRESULT hr = IVssBackupComponents_PrepareForBackup(v->backup, &job);
    if (SUCCEEDED(hr)) {
        hr = wait_for(job);
    }
    if (SUCCEEDED(hr)) {
        job = NULL;
        hr = IVssBackupComponents_DoSnapshotSet(v->backup, &job);
        if (SUCCEEDED(hr)) {
            hr = wait_for(job);
        }
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

/* Failed writers as "name: state 0x…, error 0x…" lines in out (cap wide characters). */
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
        if (SUCCEEDED(hr) && (FAILED(failure) || state >= VSS_WS_FAILED_AT_IDENTIFY)) {
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
    if (v->com) {
        CoUninitialize();
    }
    free(v);
}
