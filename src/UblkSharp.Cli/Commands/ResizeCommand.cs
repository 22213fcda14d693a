using System.CommandLine;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp resize -n ID SIZE`: a live device takes a new size (UPDATE_SIZE, Linux 6.16+). The
/// daemon serving it does the work (see <see cref="ResizeRequests"/>): its target must accept IO up
/// to the new size before the kernel sends any.
/// </summary>
internal static class ResizeCommand
{
    public static Command Create()
    {
        var number = new Option<int?>("--number", "-n") { Description = "The device id", Required = true };
        var size = new Argument<string>("size") { Description = "The new size, e.g. 2G (a multiple of the logical block size)" };
        var shrink = new Option<bool>("--shrink") { Description = "Allow a smaller size: what lies past the new end is no longer reachable" };
        var growFile = new Option<bool>("--grow-file") { Description = "loop: extend the backing file (sparse) when it is smaller than the new size" };
        var command = new Command("resize", "Change the size of a live device (Linux 6.16+)") { number, size, shrink, growFile };
        command.SetAction(r =>
        {
            var id = r.GetValue(number);
            if (id is null or < 0)
            {
                throw new ArgumentException($"bad device id {id}");
            }
            var bytes = ByteSize.Parse(r.GetValue(size)!);
            if (bytes <= 0 || bytes % 512 != 0)
            {
                throw new ArgumentException($"the size must be a positive multiple of 512 bytes, not {bytes}");
            }
            Preflight.RequireDriver();
            using var control = ControlDevice.Open();
            if ((control.GetFeatures() & UblkFeatures.UpdateSize) == 0)
            {
                throw new NotSupportedException(UblkDevice.NoUpdateSizeMessage);
            }
            DevInfo info;
            try
            {
                info = control.GetDeviceInfo((uint)id.Value);
            }
            catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
            {
                throw new ArgumentException($"no ublk device {id} (see 'ublksharp list')");
            }
            if ((DeviceState)info.state != DeviceState.Live || !Processes.IsAlive(info.ublksrv_pid))
            {
                throw new IOException($"device {id} is {((DeviceState)info.state).ToString().ToUpperInvariant()}: only a live device, with its daemon serving it, can be resized");
            }
            if (DeviceRecord.Load((uint)id.Value) is null)
            {
                throw new IOException($"device {id} is not served by a ublksharp daemon (no record in {DeviceRecord.Directory}), so its target cannot be told the new size");
            }
            var now = ResizeRequests.Send((uint)id.Value, info.ublksrv_pid, bytes, r.GetValue(shrink), r.GetValue(growFile));
            Console.WriteLine($"/dev/ublkb{id}: {now} bytes");
            return 0;
        });
        return command;
    }
}
