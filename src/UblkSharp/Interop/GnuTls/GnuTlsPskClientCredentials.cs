using System.Runtime.InteropServices;

namespace UblkSharp.Interop.GnuTls;

/// <summary>
/// A client's PSK credentials: one username and its key, taken from a psktool key file
/// (username:hexkey lines), as libnbd's tls-psk-file and qemu's tls-creds-psk read it.
/// </summary>
internal sealed unsafe class GnuTlsPskClientCredentials : SafeHandle
{
    public GnuTlsPskClientCredentials() : base(0, ownsHandle: true)
    {
    }

    public override bool IsInvalid => handle == 0;

    /// <summary>
    /// The key of <paramref name="username"/> in <paramref name="file"/>. Throws
    /// <see cref="ArgumentException"/> naming the file when it cannot be read, has no such user, or
    /// that user's key is not hex.
    /// </summary>
    public static GnuTlsPskClientCredentials FromFile(string file, string username)
    {
        var hex = KeyOf(file, username);
        GnuTls.EnsureInitialized();
        GnuTlsException.Check(GnuTls.gnutls_psk_allocate_client_credentials(out var raw), "gnutls_psk_allocate_client_credentials");
        var credentials = new GnuTlsPskClientCredentials();
        credentials.SetHandle(raw);
        try
        {
            var bytes = System.Text.Encoding.ASCII.GetBytes(hex);
            fixed (byte* p = bytes)
            {
                var key = new GnuTls.Datum { Data = p, Size = (uint)bytes.Length };
                GnuTlsException.Check(GnuTls.gnutls_psk_set_client_credentials(credentials, username, key, GnuTls.GNUTLS_PSK_KEY_HEX), $"cannot use the key of '{username}' in {file}");
            }
            // The hex key held in managed memory only as long as needed.
            Array.Clear(bytes);
        }
        catch
        {
            credentials.Dispose();
            throw;
        }
        return credentials;
    }

    /// <summary>The hex key of <paramref name="username"/> in a psktool file.</summary>
    internal static string KeyOf(string file, string username)
    {
        string[] lines;
        try
        {
            lines = File.ReadAllLines(file);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"cannot read the PSK file {file}: {e.Message}", e);
        }
        foreach (var line in lines)
        {
            var colon = line.IndexOf(':', StringComparison.Ordinal);
            if (colon > 0 && line[..colon] == username)
            {
                var key = line[(colon + 1)..].Trim();
                return key.Length > 0 && key.Length % 2 == 0 && key.All(char.IsAsciiHexDigit)
                    ? key
                    : throw new ArgumentException($"the key of '{username}' in {file} is not hex (make the file with psktool -u {username} -p {file})");
            }
        }
        throw new ArgumentException($"{file} holds no key for the user '{username}' (psktool -u {username} -p {file} adds one)");
    }

    protected override bool ReleaseHandle()
    {
        GnuTls.gnutls_psk_free_client_credentials(handle);
        return true;
    }
}
