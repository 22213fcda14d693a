using System.Net.Security;
using System.Net.Sockets;
using UblkSharp.Interop.GnuTls;
using UblkSharp.Nbd.Protocol;

namespace UblkSharp.Nbd;

/// <summary>
/// A connection's byte stream: the socket itself, or a TLS session over it once STARTTLS has been
/// agreed: an SslStream (x509) or a GnuTLS session (PSK, which SslStream lacks). Plain connections
/// go straight to the socket (no Stream in between, one null check per call); only TLS connections
/// pay for TLS. One reader and one writer may use it at once, as SslStream and GnuTLS allow.
/// </summary>
internal sealed class NbdTransport(Socket socket) : IDisposable
{
    private SslStream? _tls;
    private GnuTlsSession? _psk;
    private bool _secure;

    public Socket Socket { get; } = socket;

    public bool IsTls => _secure;

    /// <summary>The PSK username the client authenticated as (null without TLS-PSK).</summary>
    public string? PskUser { get; private set; }

    /// <summary>Reads what is there (at least one byte); 0 at the end of the stream.</summary>
    public int Receive(Span<byte> buffer) => !_secure ? Socket.Receive(buffer, SocketFlags.None) : ReceiveSecure(buffer);

    private int ReceiveSecure(Span<byte> buffer) => _psk is not null ? _psk.Receive(buffer) : _tls!.Read(buffer);

    public void SendAll(ReadOnlySpan<byte> data)
    {
        if (!_secure)
        {
            SocketIo.SendAll(Socket, data);
        }
        else if (_psk is not null)
        {
            _psk.SendAll(data);
        }
        else
        {
            _tls!.Write(data);
        }
    }

    /// <summary>Fills <paramref name="buffer"/>; false at a clean end before its first byte (as <see cref="SocketIo.ReceiveExactly"/>).</summary>
    public bool ReceiveExactly(Span<byte> buffer)
    {
        if (!_secure)
        {
            return SocketIo.ReceiveExactly(Socket, buffer);
        }
        var done = 0;
        while (done < buffer.Length)
        {
            var n = ReceiveSecure(buffer[done..]);
            if (n == 0)
            {
                if (done == 0)
                {
                    return false;
                }
                throw new EndOfStreamException($"the peer closed the connection {buffer.Length - done} bytes before the end of a message");
            }
            done += n;
        }
        return true;
    }

    public void ReceiveExactlyOrThrow(Span<byte> buffer)
    {
        if (!ReceiveExactly(buffer))
        {
            throw new EndOfStreamException("the peer closed the connection");
        }
    }

    /// <summary>
    /// The server's side of the TLS handshake, blocking. The socket's receive timeout and the
    /// server's handshake deadline (which shuts the socket) bound it like any other handshake read.
    /// Throws (AuthenticationException, IOException) if it fails; the connection is then unusable.
    /// </summary>
    public void StartTls(SslServerAuthenticationOptions options)
    {
        var tls = new SslStream(new NetworkStream(Socket, ownsSocket: false), leaveInnerStreamOpen: false);
        try
        {
            tls.AuthenticateAsServer(options);
        }
        catch
        {
            tls.Dispose();
            throw;
        }
        _tls = tls;
        _secure = true;
    }

    /// <summary>
    /// The server's side of a TLS-PSK handshake (GnuTLS on the socket's fd), blocking, bounded like
    /// <see cref="StartTls"/> and by GnuTLS's own <paramref name="timeout"/>. Throws
    /// <see cref="GnuTlsException"/> (a wrong key, an unknown user, garbage, a timeout).
    /// </summary>
    public void StartPsk(GnuTlsPskCredentials credentials, TimeSpan timeout)
    {
        // The fd stays blocking (the connection only ever makes synchronous calls on it), which is
        // what GnuTLS's own reads and writes expect.
        var session = GnuTlsSession.Server(credentials, (int)Socket.SafeHandle.DangerousGetHandle(), timeout);
        try
        {
            session.Handshake();
        }
        catch
        {
            session.Dispose();
            throw;
        }
        _psk = session;
        PskUser = session.Username;
        _secure = true;
    }

    /// <summary>The TLS session's description for the log: protocol and cipher.</summary>
    public string Describe() => _psk is not null ? _psk.Describe() : _tls is not null ? $"{_tls.SslProtocol} {_tls.NegotiatedCipherSuite}" : "plain";

    /// <summary>Ends the TLS session (not the socket, which the connection closes); a PSK session says close_notify first.</summary>
    public void Dispose()
    {
        _tls?.Dispose();
        if (_psk is null)
        {
            return;
        }
        try
        {
            // close_notify is a courtesy: a client that has stopped reading (a full send buffer)
            // must not hold the connection's close up, so the send is bounded.
            Socket.SendTimeout = 1000;
            _psk.Bye();
        }
        catch (Exception e) when (SocketIo.IsConnectionError(e))
        {
        }
        finally
        {
            _psk.Dispose();
        }
    }
}
