using System.Buffers;
using System.Net.Security;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using UblkSharp.Interop;

namespace UblkSharp.Nbd.Protocol;

/// <summary>
/// Carries a connection's bytes between an encrypted stream (an <see cref="SslStream"/>, or any
/// other stream that does the TLS) and one end of an AF_UNIX socketpair, whose other end the caller
/// gets. The nbd target's ring backend speaks NBD on that end with SEND/RECV on its io_uring, as on
/// a plain socket: TLS cannot run on the ring, and a queue thread must never block on the network.
/// Two threads per connection, each with one pooled buffer, so nothing is allocated per request:
/// one copies the socketpair into the stream, the other the stream into the socketpair. Either side
/// ending ends both: the caller closing its end makes the relay say goodbye to the server (TLS
/// close_notify) and close; the server going away (EOF, an error, a reset) shuts the caller's end
/// down, so its pending RECV sees EOF and its SEND an error, exactly as with a dead TCP connection.
/// The threads end with the connection and the last one out closes everything.
/// </summary>
internal sealed class TlsRelay
{
    /// <summary>Each direction's buffer: large enough that a 256 KiB request goes on in one write.</summary>
    public const int BufferSize = 256 * 1024;

    private static int s_threads;
    private readonly Stream _stream;
    private readonly Socket? _transport;
    private readonly Socket _local;
    private int _closed;
    private int _running;

    private TlsRelay(Stream stream, Socket? transport, Socket local)
    {
        _stream = stream;
        _transport = transport;
        _local = local;
    }

    /// <summary>Relay threads alive in this process (for tests: none may outlive its connection).</summary>
    internal static int LiveThreads => Volatile.Read(ref s_threads);

    /// <summary>
    /// Starts relaying <paramref name="stream"/> (which runs over <paramref name="transport"/>, shut
    /// down to end a read blocked in the stream) and returns the caller's end of the socketpair. The
    /// relay owns the stream and the transport from now on, also when this throws.
    /// </summary>
    public static Socket Start(Stream stream, Socket? transport, string name)
    {
        Socket ours, theirs;
        try
        {
            (ours, theirs) = SocketPair();
        }
        catch
        {
            stream.Dispose();
            transport?.Dispose();
            throw;
        }
        var relay = new TlsRelay(stream, transport, theirs) { _running = 2 };
        Interlocked.Add(ref s_threads, 2);
        new Thread(relay.ToServer) { IsBackground = true, Name = $"{name}-out" }.Start();
        new Thread(relay.FromServer) { IsBackground = true, Name = $"{name}-in" }.Start();
        return ours;
    }

    private static unsafe (Socket Ours, Socket Theirs) SocketPair()
    {
        var fds = stackalloc int[2];
        if (Libc.socketpair(Libc.AF_UNIX, Libc.SOCK_STREAM | Libc.SOCK_CLOEXEC, 0, fds) != 0)
        {
            throw new SocketException(Marshal.GetLastPInvokeError());
        }
        return (new Socket(new SafeSocketHandle(fds[0], ownsHandle: true)), new Socket(new SafeSocketHandle(fds[1], ownsHandle: true)));
    }

    /// <summary>The caller's requests to the server.</summary>
    private void ToServer()
    {
        var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
        try
        {
            while (true)
            {
                var n = _local.Receive(buffer, SocketFlags.None);
                if (n == 0)
                {
                    // The caller closed its end (after NBD_CMD_DISC, or dropping the connection):
                    // end TLS properly, so the server sees a clean close rather than a truncation.
                    NbdClient.CloseNotify(_stream);
                    break;
                }
                _stream.Write(buffer, 0, n);
            }
        }
        catch (Exception)
        {
            // Whatever broke (the server, the caller, the TLS session), the connection is over, and
            // that is all the caller needs to learn: it sees EOF on its end, as from a dead socket.
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
            Close();
            Exit();
        }
    }

    /// <summary>The server's replies to the caller.</summary>
    private void FromServer()
    {
        var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
        try
        {
            int n;
            while ((n = _stream.Read(buffer, 0, BufferSize)) > 0)
            {
                var sent = 0;
                while (sent < n)
                {
                    sent += _local.Send(buffer.AsSpan(sent, n - sent), SocketFlags.None);
                }
            }
        }
        catch (Exception)
        {
            // As above: an error ends the connection, which the caller learns from its end's EOF.
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
            Close();
            Exit();
        }
    }

    /// <summary>Ends both directions: each thread's blocking call returns (EOF or an error) at once.</summary>
    private void Close()
    {
        if (Interlocked.Exchange(ref _closed, 1) != 0)
        {
            return;
        }
        foreach (var socket in new[] { _transport, _local })
        {
            try
            {
                socket?.Shutdown(SocketShutdown.Both);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
            }
        }
    }

    private void Exit()
    {
        if (Interlocked.Decrement(ref _running) == 0)
        {
            // Both threads are out of the stream and the sockets: nothing uses them any more.
            _stream.Dispose();
            _transport?.Dispose();
            _local.Dispose();
        }
        Interlocked.Decrement(ref s_threads);
    }
}
