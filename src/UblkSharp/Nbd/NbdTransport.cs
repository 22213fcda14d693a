using System.Net.Security;
using System.Net.Sockets;
using UblkSharp.Nbd.Protocol;

namespace UblkSharp.Nbd;

/// <summary>
/// A connection's byte stream: the socket itself, or a TLS session over it once STARTTLS has been
/// agreed. Plain connections go straight to the socket (no Stream in between, one null check per
/// call); only TLS connections pay for the SslStream. One reader and one writer may use it at once,
/// as SslStream allows.
/// </summary>
internal sealed class NbdTransport(Socket socket) : IDisposable
{
    private SslStream? _tls;

    public Socket Socket { get; } = socket;

    public bool IsTls => _tls is not null;

    /// <summary>Reads what is there (at least one byte); 0 at the end of the stream.</summary>
    public int Receive(Span<byte> buffer) => _tls is null ? Socket.Receive(buffer, SocketFlags.None) : _tls.Read(buffer);

    public void SendAll(ReadOnlySpan<byte> data)
    {
        if (_tls is null)
        {
            SocketIo.SendAll(Socket, data);
        }
        else
        {
            _tls.Write(data);
        }
    }

    /// <summary>Fills <paramref name="buffer"/>; false at a clean end before its first byte (as <see cref="SocketIo.ReceiveExactly"/>).</summary>
    public bool ReceiveExactly(Span<byte> buffer)
    {
        if (_tls is null)
        {
            return SocketIo.ReceiveExactly(Socket, buffer);
        }
        var done = 0;
        while (done < buffer.Length)
        {
            var n = _tls.Read(buffer[done..]);
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
    }

    /// <summary>The TLS session's description for the log: protocol and cipher.</summary>
    public string Describe() => _tls is null ? "plain" : $"{_tls.SslProtocol} {_tls.NegotiatedCipherSuite}";

    /// <summary>Ends the TLS session (not the socket, which the connection closes).</summary>
    public void Dispose() => _tls?.Dispose();
}
