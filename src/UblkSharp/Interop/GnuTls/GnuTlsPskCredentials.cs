using System.Runtime.InteropServices;

namespace UblkSharp.Interop.GnuTls;

/// <summary>
/// A server's PSK credentials: the psktool key file (username:hexkey lines), which GnuTLS reads
/// itself at every handshake, so keys added or removed later count for the next client. Sessions
/// hold a reference (<see cref="SafeHandle.DangerousAddRef"/>) while they use it, so disposing
/// the credentials under a live session frees them only once that session is gone.
/// </summary>
internal sealed class GnuTlsPskCredentials : SafeHandle
{
    public GnuTlsPskCredentials() : base(0, ownsHandle: true)
    {
    }

    public override bool IsInvalid => handle == 0;

    public static GnuTlsPskCredentials FromFile(string path)
    {
        GnuTls.EnsureInitialized();
        GnuTlsException.Check(GnuTls.gnutls_psk_allocate_server_credentials(out var raw), "gnutls_psk_allocate_server_credentials");
        var credentials = new GnuTlsPskCredentials();
        credentials.SetHandle(raw);
        try
        {
            GnuTlsException.Check(GnuTls.gnutls_psk_set_server_credentials_file(credentials, path), $"cannot use {path} as a PSK file");
        }
        catch
        {
            credentials.Dispose();
            throw;
        }
        return credentials;
    }

    protected override bool ReleaseHandle()
    {
        GnuTls.gnutls_psk_free_server_credentials(handle);
        return true;
    }
}
