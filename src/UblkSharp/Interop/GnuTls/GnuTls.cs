using System.Runtime.InteropServices;

namespace UblkSharp.Interop.GnuTls;

/// <summary>
/// The few GnuTLS entry points TLS-PSK needs, server and client (libgnutls.so.30, the library qemu, nbdkit and
/// libnbd use). Errors are negative GNUTLS_E_* codes. Values are gnutls.h's, checked by
/// GnuTlsConstantsTests against the installed header.
/// </summary>
internal static unsafe partial class GnuTls
{
    private const string Lib = "libgnutls.so.30";

    public const int GNUTLS_E_SUCCESS = 0;
    public const int GNUTLS_E_FATAL_ALERT_RECEIVED = -12;
    public const int GNUTLS_E_WARNING_ALERT_RECEIVED = -16;
    public const int GNUTLS_E_AGAIN = -28;
    public const int GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER = -55;
    public const int GNUTLS_E_INTERRUPTED = -52;
    public const int GNUTLS_E_PUSH_ERROR = -53;
    public const int GNUTLS_E_PULL_ERROR = -54;
    public const int GNUTLS_E_PREMATURE_TERMINATION = -110;
    public const int GNUTLS_E_TIMEDOUT = -319;

    public const uint GNUTLS_SERVER = 1;
    public const uint GNUTLS_CLIENT = 1 << 1;
    public const int GNUTLS_PSK_KEY_HEX = 1;
    public const uint GNUTLS_NO_SIGNAL = 1 << 6;
    public const int GNUTLS_CRD_PSK = 4;
    public const int GNUTLS_SHUT_WR = 1;

    [LibraryImport(Lib, EntryPoint = "gnutls_global_init")]
    public static partial int gnutls_global_init();

    [LibraryImport(Lib, EntryPoint = "gnutls_strerror")]
    public static partial byte* gnutls_strerror(int error);

    [LibraryImport(Lib, EntryPoint = "gnutls_error_is_fatal")]
    public static partial int gnutls_error_is_fatal(int error);

    [LibraryImport(Lib, EntryPoint = "gnutls_psk_allocate_server_credentials")]
    public static partial int gnutls_psk_allocate_server_credentials(out nint credentials);

    [LibraryImport(Lib, EntryPoint = "gnutls_psk_free_server_credentials")]
    public static partial void gnutls_psk_free_server_credentials(nint credentials);

    [LibraryImport(Lib, EntryPoint = "gnutls_psk_set_server_credentials_file", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int gnutls_psk_set_server_credentials_file(GnuTlsPskCredentials credentials, string passwordFile);

    [LibraryImport(Lib, EntryPoint = "gnutls_psk_allocate_client_credentials")]
    public static partial int gnutls_psk_allocate_client_credentials(out nint credentials);

    [LibraryImport(Lib, EntryPoint = "gnutls_psk_free_client_credentials")]
    public static partial void gnutls_psk_free_client_credentials(nint credentials);

    [LibraryImport(Lib, EntryPoint = "gnutls_psk_set_client_credentials", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int gnutls_psk_set_client_credentials(GnuTlsPskClientCredentials credentials, string username, in Datum key, int flags);

    /// <summary>gnutls_datum_t.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct Datum
    {
        public byte* Data;
        public uint Size;
    }

    [LibraryImport(Lib, EntryPoint = "gnutls_init")]
    public static partial int gnutls_init(out nint session, uint flags);

    [LibraryImport(Lib, EntryPoint = "gnutls_deinit")]
    public static partial void gnutls_deinit(nint session);

    [LibraryImport(Lib, EntryPoint = "gnutls_set_default_priority_append", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int gnutls_set_default_priority_append(GnuTlsSession session, string addPriority, out nint errorPosition, uint flags);

    [LibraryImport(Lib, EntryPoint = "gnutls_credentials_set")]
    public static partial int gnutls_credentials_set(GnuTlsSession session, int type, nint credentials);

    [LibraryImport(Lib, EntryPoint = "gnutls_transport_set_int2")]
    public static partial void gnutls_transport_set_int2(GnuTlsSession session, int receiveFd, int sendFd);

    [LibraryImport(Lib, EntryPoint = "gnutls_handshake_set_timeout")]
    public static partial void gnutls_handshake_set_timeout(GnuTlsSession session, uint milliseconds);

    [LibraryImport(Lib, EntryPoint = "gnutls_handshake")]
    public static partial int gnutls_handshake(GnuTlsSession session);

    [LibraryImport(Lib, EntryPoint = "gnutls_record_send")]
    public static partial nint gnutls_record_send(GnuTlsSession session, byte* data, nuint size);

    [LibraryImport(Lib, EntryPoint = "gnutls_record_recv")]
    public static partial nint gnutls_record_recv(GnuTlsSession session, byte* data, nuint size);

    [LibraryImport(Lib, EntryPoint = "gnutls_bye")]
    public static partial int gnutls_bye(GnuTlsSession session, int how);

    [LibraryImport(Lib, EntryPoint = "gnutls_psk_server_get_username")]
    public static partial byte* gnutls_psk_server_get_username(GnuTlsSession session);

    [LibraryImport(Lib, EntryPoint = "gnutls_alert_get")]
    public static partial int gnutls_alert_get(GnuTlsSession session);

    [LibraryImport(Lib, EntryPoint = "gnutls_alert_send_appropriate")]
    public static partial int gnutls_alert_send_appropriate(GnuTlsSession session, int error);

    [LibraryImport(Lib, EntryPoint = "gnutls_alert_get_name")]
    public static partial byte* gnutls_alert_get_name(int alert);

    [LibraryImport(Lib, EntryPoint = "gnutls_protocol_get_version")]
    public static partial int gnutls_protocol_get_version(GnuTlsSession session);

    [LibraryImport(Lib, EntryPoint = "gnutls_protocol_get_name")]
    public static partial byte* gnutls_protocol_get_name(int version);

    [LibraryImport(Lib, EntryPoint = "gnutls_cipher_get")]
    public static partial int gnutls_cipher_get(GnuTlsSession session);

    [LibraryImport(Lib, EntryPoint = "gnutls_cipher_get_name")]
    public static partial byte* gnutls_cipher_get_name(int cipher);

    [LibraryImport(Lib, EntryPoint = "gnutls_kx_get")]
    public static partial int gnutls_kx_get(GnuTlsSession session);

    [LibraryImport(Lib, EntryPoint = "gnutls_kx_get_name")]
    public static partial byte* gnutls_kx_get_name(int kx);

    /// <summary>A static C string GnuTLS returns (names, messages); "" for NULL.</summary>
    public static string Text(byte* s) => s is null ? "" : Marshal.PtrToStringUTF8((nint)s) ?? "";

    private static readonly Lazy<int> Initialized = new(gnutls_global_init);

    /// <summary>
    /// gnutls_global_init, once per process (GnuTLS also does it when loaded, and counts calls, so
    /// this only makes a broken installation fail here, with its reason, rather than at a handshake).
    /// Throws <see cref="NotSupportedException"/> when libgnutls.so.30 is not installed.
    /// </summary>
    public static void EnsureInitialized()
    {
        int rc;
        try
        {
            rc = Initialized.Value;
        }
        catch (DllNotFoundException e)
        {
            throw new NotSupportedException($"TLS-PSK needs GnuTLS, and {Lib} cannot be loaded (install libgnutls30): {e.Message}", e);
        }
        GnuTlsException.Check(rc, "gnutls_global_init");
    }
}
