namespace UblkSharp.Interop.GnuTls;

/// <summary>
/// A blocking <see cref="Stream"/> over a handshaken <see cref="GnuTlsSession"/>, for code written
/// against streams (the nbd target's TLS relay takes SslStream or this alike). The socket stays
/// the caller's; disposing sends close_notify and frees the session.
/// </summary>
internal sealed class GnuTlsStream(GnuTlsSession session, System.Net.Sockets.Socket socket) : Stream
{
    /// <summary>"TLS1.3 AES-256-GCM DHE-PSK".</summary>
    public string Description => session.Describe();

    /// <summary>
    /// Sends close_notify, so the peer sees a clean end rather than a truncation; bounded (1 s), as a
    /// peer that stopped reading must not hold the close up. Failures are ignored: the socket closes next.
    /// </summary>
    public void CloseNotify()
    {
        if (session.IsClosed)
        {
            return;
        }
        try
        {
            socket.SendTimeout = 1000;
        }
        catch (Exception e) when (e is System.Net.Sockets.SocketException or ObjectDisposedException)
        {
            return;
        }
        session.Bye();
    }

    public override bool CanRead => true;

    public override bool CanWrite => true;

    public override bool CanSeek => false;

    public override long Length => throw new NotSupportedException();

    public override long Position
    {
        get => throw new NotSupportedException();
        set => throw new NotSupportedException();
    }

    public override int Read(Span<byte> buffer) => buffer.IsEmpty ? 0 : session.Receive(buffer);

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override void Write(ReadOnlySpan<byte> buffer) => session.SendAll(buffer);

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

    public override void Flush()
    {
        // Every SendAll has gone to the socket.
    }

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing && !session.IsClosed)
        {
            CloseNotify();
            session.Dispose();
        }
        base.Dispose(disposing);
    }
}
