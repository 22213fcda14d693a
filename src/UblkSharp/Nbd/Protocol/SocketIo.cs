using System.Net.Sockets;

namespace UblkSharp.Nbd.Protocol;

/// <summary>Blocking socket reads and writes of whole messages.</summary>
internal static class SocketIo
{
    public static void SendAll(Socket socket, ReadOnlySpan<byte> data)
    {
        while (data.Length > 0)
        {
            var n = socket.Send(data, SocketFlags.None);
            if (n <= 0)
            {
                throw new SocketException((int)SocketError.ConnectionReset);
            }
            data = data[n..];
        }
    }

    /// <summary>
    /// Fills <paramref name="buffer"/>. False when the peer closed before sending anything (a clean
    /// end at a message boundary); an end in the middle throws <see cref="EndOfStreamException"/>.
    /// </summary>
    public static bool ReceiveExactly(Socket socket, Span<byte> buffer)
    {
        var done = 0;
        while (done < buffer.Length)
        {
            var n = socket.Receive(buffer[done..], SocketFlags.None);
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

    public static void ReceiveExactlyOrThrow(Socket socket, Span<byte> buffer)
    {
        if (!ReceiveExactly(socket, buffer))
        {
            throw new EndOfStreamException("the peer closed the connection");
        }
    }

    /// <summary>Errors that mean the peer or the socket is gone, as opposed to bugs.</summary>
    public static bool IsConnectionError(Exception e) => e is SocketException or EndOfStreamException or ObjectDisposedException or IOException;
}
