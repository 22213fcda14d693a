using System.Runtime.InteropServices;
using static UblkSharp.Interop.GnuTls.GnuTls;

namespace UblkSharp.Interop.GnuTls;

/// <summary>
/// One side (server or client) of a TLS-PSK session over a connected, blocking socket fd (GnuTLS reads and
/// writes the fd itself). One thread may receive while another sends, which GnuTLS allows; the
/// handshake and <see cref="Bye"/> must have the session to themselves.
/// </summary>
internal sealed unsafe class GnuTlsSession : SafeHandle
{
    // The key exchanges that use a PSK, which GnuTLS's default priorities leave out; qemu and
    // nbdkit append the same ones (qemu: crypto/tlscredspsk.c, nbdkit: server/crypto.c).
    private const string PskPriority = "+ECDHE-PSK:+DHE-PSK:+PSK";

    // The credentials (server's or client's), held while the session may use them.
    private SafeHandle? _credentials;
    private bool _isClient;

    public GnuTlsSession() : base(0, ownsHandle: true)
    {
    }

    public override bool IsInvalid => handle == 0;

    /// <summary>A server session on <paramref name="fd"/>, ready for <see cref="Handshake"/>.</summary>
    public static GnuTlsSession Server(GnuTlsPskCredentials credentials, int fd, TimeSpan handshakeTimeout)
        => Create(GNUTLS_SERVER, credentials, fd, handshakeTimeout);

    /// <summary>A client session on <paramref name="fd"/> (after NBD_OPT_STARTTLS), ready for <see cref="Handshake"/>.</summary>
    public static GnuTlsSession Client(GnuTlsPskClientCredentials credentials, int fd, TimeSpan handshakeTimeout)
        => Create(GNUTLS_CLIENT, credentials, fd, handshakeTimeout);

    private static GnuTlsSession Create(uint side, SafeHandle credentials, int fd, TimeSpan handshakeTimeout)
    {
        EnsureInitialized();
        // NO_SIGNAL: a peer that has gone away must not raise SIGPIPE in the process.
        GnuTlsException.Check(gnutls_init(out var raw, side | GNUTLS_NO_SIGNAL), "gnutls_init");
        var session = new GnuTlsSession { _isClient = side == GNUTLS_CLIENT };
        session.SetHandle(raw);
        try
        {
            var added = false;
            credentials.DangerousAddRef(ref added);
            session._credentials = credentials;
            GnuTlsException.Check(gnutls_set_default_priority_append(session, PskPriority, out _, 0), "gnutls_set_default_priority_append");
            GnuTlsException.Check(gnutls_credentials_set(session, GNUTLS_CRD_PSK, credentials.DangerousGetHandle()), "gnutls_credentials_set");
            gnutls_transport_set_int2(session, fd, fd);
            gnutls_handshake_set_timeout(session, (uint)Math.Clamp(handshakeTimeout.TotalMilliseconds, 1, int.MaxValue));
        }
        catch
        {
            session.Dispose();
            throw;
        }
        return session;
    }

    /// <summary>
    /// The handshake, blocking. Throws <see cref="GnuTlsException"/> with what went wrong (a wrong
    /// key, an unknown user, a timeout, garbage); the session is then unusable.
    /// </summary>
    public void Handshake()
    {
        int rc;
        do
        {
            rc = gnutls_handshake(this);
        }
        // On a blocking fd, AGAIN is the socket's receive timeout: the handshake took too long.
        while (rc < 0 && rc != GNUTLS_E_AGAIN && gnutls_error_is_fatal(rc) == 0);
        if (rc < 0)
        {
            var reason = rc switch
            {
                GNUTLS_E_FATAL_ALERT_RECEIVED when _isClient =>
                    $"the server refused the TLS-PSK handshake with the alert '{Text(gnutls_alert_get_name(gnutls_alert_get(this)))}' (a wrong key, or a username it does not know)",
                GNUTLS_E_FATAL_ALERT_RECEIVED => $"the client sent the alert '{Text(gnutls_alert_get_name(gnutls_alert_get(this)))}'",
                // A binder that does not verify. GnuTLS answers an unknown username with a random
                // key, so it fails the same way and clients cannot probe for usernames.
                GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER => $"the client's PSK does not match: a wrong key, or a username the key file does not hold ({GnuTlsException.Describe(rc)})",
                _ => GnuTlsException.Describe(rc),
            };
            if (rc is not (GNUTLS_E_AGAIN or GNUTLS_E_TIMEDOUT or GNUTLS_E_PREMATURE_TERMINATION or GNUTLS_E_PULL_ERROR or GNUTLS_E_PUSH_ERROR))
            {
                // The client learns why (an alert) rather than seeing the connection just end.
                gnutls_alert_send_appropriate(this, rc);
            }
            throw new GnuTlsException(rc, reason);
        }
    }

    /// <summary>Reads what is there (at least one byte); 0 at the end of the stream, with or without the client's close_notify.</summary>
    public int Receive(Span<byte> buffer)
    {
        while (true)
        {
            nint n;
            fixed (byte* p = buffer)
            {
                n = gnutls_record_recv(this, p, (nuint)buffer.Length);
            }
            if (n >= 0)
            {
                return (int)n;
            }
            // NBD frames its own messages: a connection cut mid-message is caught there, so a
            // client that closes without close_notify ends like a plain one.
            if (n == GNUTLS_E_PREMATURE_TERMINATION)
            {
                return 0;
            }
            if (n is GNUTLS_E_INTERRUPTED or GNUTLS_E_WARNING_ALERT_RECEIVED)
            {
                continue;
            }
            throw new GnuTlsException((int)n, n == GNUTLS_E_AGAIN ? "TLS receive timed out" : $"TLS receive: {GnuTlsException.Describe((int)n)}");
        }
    }

    public void SendAll(ReadOnlySpan<byte> data)
    {
        fixed (byte* p = data)
        {
            var done = 0;
            while (done < data.Length)
            {
                // One record at most per call (16 KiB): the rest goes in the next.
                var n = gnutls_record_send(this, p + done, (nuint)(data.Length - done));
                if (n > 0)
                {
                    done += (int)n;
                }
                else if (n != GNUTLS_E_INTERRUPTED)
                {
                    throw new GnuTlsException((int)n, $"TLS send: {GnuTlsException.Describe((int)n)}");
                }
            }
        }
    }

    /// <summary>Sends close_notify (does not wait for the client's); failures are ignored, as the socket closes next.</summary>
    public void Bye()
    {
        int rc;
        do
        {
            rc = gnutls_bye(this, GNUTLS_SHUT_WR);
        }
        while (rc == GNUTLS_E_INTERRUPTED);
    }

    /// <summary>
    /// The PSK username the client gave (null before it did), made printable for a log: the client
    /// chooses it, so control characters are escaped and its length is bounded.
    /// </summary>
    public string? Username
    {
        get
        {
            var name = gnutls_psk_server_get_username(this);
            return name is null ? null : Printable(Text(name));
        }
    }

    private static string Printable(string s)
    {
        var b = new System.Text.StringBuilder();
        foreach (var c in s.Length > 128 ? s[..128] : s)
        {
            b.Append(char.IsControl(c) ? $"\\x{(int)c:x2}" : c);
        }
        return s.Length > 128 ? b.Append("...").ToString() : b.ToString();
    }

    /// <summary>Protocol, cipher and key exchange, for the log: "TLS1.3 AES-256-GCM DHE-PSK".</summary>
    public string Describe()
        => $"{Text(gnutls_protocol_get_name(gnutls_protocol_get_version(this)))} {Text(gnutls_cipher_get_name(gnutls_cipher_get(this)))} {Text(gnutls_kx_get_name(gnutls_kx_get(this)))}";

    protected override bool ReleaseHandle()
    {
        gnutls_deinit(handle);
        _credentials?.DangerousRelease();
        return true;
    }
}
