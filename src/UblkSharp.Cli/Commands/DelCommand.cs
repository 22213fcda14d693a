using System.CommandLine;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp del`: STOP_DEV (IO drains through the daemon), wait for the daemon to exit, then
/// DEL_DEV. A device that is open is refused as busy: by the kernel (TRY_STOP_DEV) where the
/// device has SAFE_STOP_DEV, else when it is mounted or held open exclusively (a check, then the stop).
/// </summary>
internal static class DelCommand
{
    private static readonly TimeSpan DaemonExitTimeout = TimeSpan.FromSeconds(30);

    // A short-lived opener (udev's blkid probe after a change) is waited out; a real holder is not.
    private static readonly TimeSpan TransientOpenerWait = TimeSpan.FromSeconds(2);

    public static Command Create()
    {
        var number = new Option<int?>("--number", "-n") { Description = "The device id" };
        var all = new Option<bool>("--all", "-a") { Description = "Delete every ublk device" };
        var force = new Option<bool>("--force") { Description = "Delete even a mounted or held device: its IO fails from now on" };
        var command = new Command("del", "Stop and delete ublk devices") { number, all, force };
        command.SetAction(r =>
        {
            var id = r.GetValue(number);
            var everyDevice = r.GetValue(all);
            if (id is null == !everyDevice)
            {
                throw new ArgumentException("give either -n ID or --all");
            }
            if (id is < 0)
            {
                throw new ArgumentException($"bad device id {id}");
            }
            Preflight.RequireRootAndDriver();
            using var control = ControlDevice.Open();
            var ids = everyDevice ? DeviceList.Ids() : [(uint)id!.Value];
            var failures = 0;
            foreach (var dev in ids)
            {
                try
                {
                    Delete(control, dev, r.GetValue(force));
                }
                catch (Exception e) when (CliErrors.IsExpected(e) && everyDevice)
                {
                    Console.Error.WriteLine($"ublksharp: device {dev}: {CliErrors.Describe(e)}");
                    failures++;
                }
            }
            return failures == 0 ? 0 : CliErrors.Failure;
        });
        return command;
    }

    private static void Delete(ControlDevice control, uint id, bool force)
    {
        DevInfo info;
        try
        {
            info = control.GetDeviceInfo(id);
        }
        catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
        {
            throw new ArgumentException($"no ublk device {id} (see 'ublksharp list')");
        }
        var block = $"/dev/ublkb{id}";
        if (force)
        {
            control.StopDevice(id, TimeSpan.FromSeconds(60));
        }
        else if (!UblkDevice.TryStop(control, id, TimeSpan.FromSeconds(60), TransientOpenerWait))
        {
            var what = (info.flags & (ulong)UblkFeatures.SafeStopDev) != 0 ? "open (mounted, or held by a process)" : "mounted or held open exclusively";
            throw new IOException($"device {id} is busy: {block} is {what}; unmount it first (or del --force, and its IO fails)");
        }
        var pid = info.ublksrv_pid;
        if (pid > 0 && pid != Environment.ProcessId && !Processes.WaitForExit(pid, DaemonExitTimeout))
        {
            // A daemon that ignores the stop cannot keep the device: its queues are already aborted.
            Processes.Signal(pid, Processes.SIGKILL);
            Processes.WaitForExit(pid, TimeSpan.FromSeconds(10));
        }
        // Asynchronous where the kernel has it: a forced delete must not wait for a mount to go.
        UblkDevice.DeleteDevice(control, id, TimeSpan.FromSeconds(60));
        DeviceRecord.Remove(id);
    }
}
